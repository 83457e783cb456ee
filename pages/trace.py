import pandas as pd
import streamlit as st

from moeviz.data import load_texts
from moeviz.trace import NONE_WORSE, legend_html, loss_changes, shown_token, tokens_html
from pages.common import current_model, finished, persistent, poll, stats_ui, submit

name, skeleton, adapter, fingerprint = current_model()
st.title("Trace")
st.caption(
    "One text through the experts: each token on the colour of the first expert its router picks in the "
    "chosen layer (hover a token for its top-k experts and their weights). With the Prune page's plan, the "
    "text runs twice, and the tokens the plan sends to other experts are underlined."
)
stats = stats_ui(fingerprint)
source = (stats.meta.get("calibration") or {}).get("data", "demo") if stats else "demo"
try:  # a held-out sample of the calibration source, as a start
    default = load_texts(source, 1, seed=1, split="heldout")[0][:400]
except (ValueError, OSError):
    default = "12+30=42\nrev abc:cba"
text = persistent(st.text_area, "Text", key="trace_text", default=default, height=100,
                  help="type or paste a text; a sample of the calibration text is the default")
plan = st.session_state.get("current_plan")
use_plan = st.toggle("Under the Prune page's plan" + (f" ({plan['method']}, {plan['ratio']:.0%}, {plan['mode']})"
                                                      if plan else " (open the Prune page first)"),
                     key="trace_with_plan", disabled=plan is None)
if st.button("Trace", type="primary"):
    st.session_state["trace_job"] = submit(name, "trace", text=text, plan=plan if use_plan else None,
                                           stats=st.session_state.get("current_plan_stats") if use_plan else None)
    st.session_state.pop("trace_result", None)


if st.session_state.get("trace_job"):
    poll(name, "trace_job", "Tracing")
if traced := finished("trace_job", "Tracing"):
    st.session_state["trace_result"] = traced  # kept while the layer or the framed expert changes
result = st.session_state.get("trace_result")
if not result:
    st.stop()

c1, c2 = st.columns(2)
layer_idx = persistent(c1.selectbox, "Layer", options=result["layers"], key="trace_layer", default=result["layers"][0])
row = result["layers"].index(layer_idx)
# every expert of the model: the options (and so the choice) stay when the trace is run again with a plan
highlight = c2.selectbox("Frame the tokens of expert", [None, *range(result["num_experts"])], key="trace_highlight",
                         format_func=lambda e: "none" if e is None else f"expert {e}")
st.html(tokens_html(result, layer_idx, highlight, pruned="pruned" in result))
st.html(legend_html(result, layer_idx))
if "pruned" in result:
    st.write(f"The plan sends **{result['rerouted'][row]:.0%}** of this layer's tokens to other experts "
             f"(all layers: {', '.join(f'{r:.0%}' for r in result['rerouted'])}).")
    st.subheader("Where the prediction got worse")
    if worse := loss_changes(result):
        st.dataframe(pd.DataFrame(worse).assign(token=lambda d: d["token"].map(shown_token),
                                                context=lambda d: d["context"].map(shown_token)), hide_index=True)
    else:
        st.write(NONE_WORSE)
