import numpy as np
import pytest
import torch

from moeviz import analysis
from moeviz.adapters import get_adapter
from moeviz.calibrate import CalibConfig, calibrate, calibrate_chunks
from moeviz.methods import PlanConfig
from moeviz.tiny import tiny_model


def _twin_model(permute: bool):
    """Mixtral with expert 3 a copy of expert 1 (its intermediate neurons permuted if asked)."""
    model = tiny_model("mixtral")
    for layer in get_adapter(model).layers:
        exp, I = layer.experts, layer.intermediate_size
        perm = torch.randperm(I, generator=torch.Generator().manual_seed(0)) if permute else torch.arange(I)
        with torch.no_grad():
            gate, up = exp.gate_up_proj[1][:I], exp.gate_up_proj[1][I:]
            exp.gate_up_proj[3] = torch.cat([gate[perm], up[perm]])
            exp.down_proj[3] = exp.down_proj[1][:, perm]
    return model


@pytest.fixture(scope="module")
def twins():
    model = _twin_model(permute=True)
    stats, _ = calibrate(model, CalibConfig(data="random", num_samples=8, seq_len=32, probe_tokens=64), use_cache=False)
    return model, stats


@pytest.mark.parametrize("space", analysis.SPACES)
def test_similarity_is_symmetric_with_ones_on_the_diagonal(twins, space):
    model, stats = twins
    sim = analysis.similarity(stats, space, get_adapter(model))
    assert sim.shape == (2, 8, 8)
    np.testing.assert_allclose(sim, sim.transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(np.diagonal(sim, axis1=1, axis2=2), 1.0)


def test_permuted_twins_are_found_by_invariant_weights_and_outputs(twins):
    model, stats = twins
    adapter = get_adapter(model)
    for space in ("weights_invariant", "outputs"):
        sim = analysis.similarity(stats, space, adapter)
        np.testing.assert_allclose(sim[:, 1, 3], 1.0, atol=1e-5)
        for layer_sim in sim:
            labels, link = analysis.cluster_layer(layer_sim, n_clusters=7)
            assert labels[1] == labels[3] and len(set(labels)) == 7
    plain = analysis.similarity(stats, "weights", adapter)
    assert (plain[:, 1, 3] < 0.9).all(), "flattened weights miss a permuted copy"
    unpermuted = analysis.similarity(None, "weights", get_adapter(_twin_model(permute=False)))
    np.testing.assert_allclose(unpermuted[:, 1, 3], 1.0, atol=1e-6)


def _flat_gram(layer) -> np.ndarray:
    weights = [layer.expert_weights(e) for e in range(layer.num_experts)]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in (w.gate, w.up, w.down) if t is not None])
                        for w in weights]).detach().double()
    return (flat @ flat.T).numpy()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_weight_gram_is_the_inner_product_of_flattened_weights(model_type):
    layer = get_adapter(tiny_model(model_type)).layers[0]
    np.testing.assert_allclose(analysis.weight_gram(layer, block=7), _flat_gram(layer), rtol=1e-5, atol=1e-6)


def test_homogeneity_of_identical_experts_is_maximal():
    model = tiny_model("olmoe")
    with torch.no_grad():
        for layer in get_adapter(model).layers[:1]:
            layer.experts.gate_up_proj[:] = layer.experts.gate_up_proj[0]
            layer.experts.down_proj[:] = layer.experts.down_proj[0]
    stats, _ = calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=32, probe_tokens=32), use_cache=False)
    h = analysis.homogeneity(stats, analysis.similarity(stats, "outputs"))
    assert h["mean_similarity"][0] == pytest.approx(1.0, abs=1e-6)
    assert h["mean_similarity"][1] < 0.99
    assert 0 < h["usage_entropy"].max() <= 3.0 + 1e-9  # log2(8)
    assert ((0 < h["half_mass_fraction"]) & (h["half_mass_fraction"] <= 1)).all()
    assert analysis.layer_similarity(stats).shape == (2, 2)


def test_stability_is_exact_at_the_full_size_and_lower_below():
    model = tiny_model("qwen3_moe")
    chunks = calibrate_chunks(model, CalibConfig(data="random", num_samples=16, seq_len=8, probe_tokens=0), 8)
    rows = analysis.stability(chunks, PlanConfig("frequency", ratio=0.25), bootstrap=3)
    assert [r["chunks"] for r in rows] == list(range(1, 9))
    assert rows[-1]["overlap"] == 1.0 and rows[-1]["rank_correlation"] == pytest.approx(1.0)
    assert rows[0]["overlap"] < 1.0 and rows[0]["rank_correlation"] < 1.0
    assert rows[0]["tokens"] == 16 and rows[-1]["tokens"] == 128
    assert rows[-1]["overlap_bootstrap"] <= 1.0


def test_specialisation_shares_sum_to_one(twins):
    _, stats = twins
    other, _ = calibrate(tiny_model("mixtral"), CalibConfig(data="random", num_samples=4, seq_len=32, seed=1,
                                                             probe_tokens=0), use_cache=False)
    names, share = analysis.specialisation({"a": stats, "b": other})
    assert names == ["a", "b"] and share.shape == (2, 2, 8)
    np.testing.assert_allclose(share.sum(0), 1.0)
    index = analysis.specialisation_index(share)
    assert index.shape == (2,) and ((0 <= index) & (index <= 1)).all()
    np.testing.assert_allclose(analysis.specialisation_index(analysis.specialisation({"a": stats, "b": stats})[1]), 0.0)
    names, overlap, rho = analysis.source_agreement({"a": stats, "b": other, "a again": stats},
                                                    PlanConfig("frequency", ratio=0.25))
    assert names == ["a", "b", "a again"] and overlap[0, 2] == 1.0 and rho[0, 2] == pytest.approx(1.0)
    assert 0 <= overlap[0, 1] <= 1 and -1 <= rho[0, 1] < 1 and np.allclose(np.diag(overlap), 1)
    one_each = np.zeros((2, 1, 4))
    one_each[0, 0, :2] = one_each[1, 0, 2:] = 1.0  # experts 0–1 serve only a, 2–3 only b
    np.testing.assert_allclose(analysis.specialisation_index(one_each), 1.0)


def test_embeddings_and_global_clusters(twins):
    model, stats = twins
    feats = stats.probe_mean.numpy()
    xy = analysis.embed_experts(feats, method="pca")
    assert xy.shape == (2, 8, 2) and np.isfinite(xy).all()
    labels = analysis.cluster_all_layers(feats, n_clusters=4)
    assert labels.shape == (2, 8) and labels.max() == 4
    scores = analysis.silhouette_by_count(analysis.similarity(stats, "outputs")[0], range(2, 7))
    assert scores and all(-1 <= s <= 1 for s in scores.values())


def test_umap_embedding(twins):
    _, stats = twins
    xy = analysis.embed_experts(stats.probe_mean.numpy(), method="umap")
    assert xy.shape == (2, 8, 2) and np.isfinite(xy).all()



def test_weight_spaces_from_the_files_equal_those_of_the_loaded_model(tmp_path):
    from moeviz.adapters import get_adapter
    from moeviz.analysis import similarity
    from moeviz.checkpoint import Checkpoint, FileLayer
    from moeviz.loading import load_skeleton
    from moeviz.tiny import tiny_model

    for family in ("mixtral", "qwen2_moe"):
        model = tiny_model(family)
        model.save_pretrained(tmp_path / family)
        ckpt = Checkpoint(tmp_path / family)
        files = type("Files", (), {"layers": [FileLayer(ckpt, layer)
                                              for layer in get_adapter(load_skeleton(tmp_path / family)).layers]})
        for space in ("weights", "weights_invariant", "router"):
            np.testing.assert_allclose(similarity(None, space, files), similarity(None, space, get_adapter(model)),
                                       atol=1e-6)
