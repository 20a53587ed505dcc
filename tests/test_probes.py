import pytest
import torch
import torch.nn.functional as F
import xarray as xr

import probes
from eemllm_models import load_shapes_vqa, load_zoo
from eemllm_models.zoo import build
from probes.attention import attention_statistics_batch
from probes.contribution import GROUPS, reference_contributions, sweep_contributions
from probes.runner import PromptedBatch
from tiny_models import FAMILIES, family_variants

INTERVENTIONS = (*GROUPS, "frozen", "naavit", "composite")


def _tiny(family: str, attn: str = "sdpa", batch: int = 3, images: int = 2, answer_positions: bool = False):
    build_model, build_batch = FAMILIES[family]
    model = build_model(seed=3, attn=attn)
    inputs = build_batch(model, batch, images, seed=4, padding="left")
    width = inputs["input_ids"].shape[1]
    if answer_positions:  # the last 1..3 positions, a different count per row
        positions = torch.tensor([[width - 3, width - 2, width - 1]] * batch)
        mask = torch.arange(3)[None, :] >= (2 - torch.arange(batch) % 3)[:, None]
    else:
        positions, mask = torch.full((batch, 1), width - 1), torch.ones(batch, 1, dtype=torch.bool)
    return model, PromptedBatch(list(range(batch)), inputs, positions, mask)


@pytest.mark.parametrize(("family", "answer_positions"), family_variants(False, True))
def test_sweep_equals_full_forward_reference(family, answer_positions):
    model, batch = _tiny(family, answer_positions=answer_positions)
    with torch.no_grad():
        sweep = sweep_contributions(model, batch, INTERVENTIONS)
        reference = reference_contributions(model, batch, INTERVENTIONS)
    assert sweep.shape == (3, 4, len(INTERVENTIONS))
    torch.testing.assert_close(sweep, reference, rtol=1e-4, atol=1e-6)
    assert (sweep[:, :-1] > 1e-6).all()
    # The last layer's visual rows feed nothing after it: removing their update changes no prediction.
    assert (sweep[:, -1, [0, 2, 3, 4]] == 0).all() and (sweep[:, -1, 1] > 1e-6).all()
    torch.testing.assert_close(sweep[..., INTERVENTIONS.index("frozen")], sweep[..., 0])  # frozen == visual LC


def test_layer_contribution_is_shortvs_kl_written_plainly():
    """Layer 1's visual LC by hand: a hook keeps visual rows unchanged, KL(P_orig || P_ablated) at the last position."""
    model, batch = _tiny("llava")
    layer = model.model.language_model.layers[1]
    visual = batch.inputs["input_ids"] == model.config.image_token_id
    with torch.no_grad():
        original = model(**batch.inputs).logits[:, -1].log_softmax(-1)
        handle = layer.register_forward_hook(
            lambda module, args, kwargs, out: torch.where(visual[..., None], args[0], out), with_kwargs=True)
        ablated = model(**batch.inputs).logits[:, -1].log_softmax(-1)
        handle.remove()
        sweep = sweep_contributions(model, batch, ("visual",))
    by_hand = F.kl_div(ablated, original, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(sweep[:, 1, 0], by_hand, rtol=1e-4, atol=1e-7)
    reverse = sweep_contributions(model, batch, ("visual",), "kl_reverse")[:, 1, 0]
    torch.testing.assert_close(reverse, F.kl_div(original, ablated, log_target=True, reduction="none").sum(-1),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])  # the llama and qwen3 (q/k norms) decoder styles
def test_attention_statistics_match_the_models_own_attention_maps(family):
    model, batch = _tiny(family, attn="eager")
    with torch.no_grad():
        stats = attention_statistics_batch(model, batch, sink_tokens=1)
        maps = model(**batch.inputs, output_attentions=True).attentions  # L x [B, H, T, T]
    visual = batch.inputs["input_ids"] == model.config.image_token_id
    text = batch.inputs["attention_mask"].bool() & ~visual
    for layer, probs in enumerate(maps):
        to_visual = (probs * visual[:, None, None, :]).sum(-1)  # [B, H, T]
        expected = (to_visual * text[:, None]).sum(-1) / text.sum(-1)[:, None]
        torch.testing.assert_close(stats["text_to_visual"][:, layer], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats["last_to_visual"][:, layer], to_visual[:, :, -1], rtol=1e-4, atol=1e-5)
    assert stats["entropy"].shape == (3, 4, 4, 2)


@pytest.fixture(scope="module")
def untrained():
    """An untrained model of the default's architecture and its processor: the runner's mechanics need no weights."""
    model, processor = build.build_untrained(0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def trained():
    """The embedded default model: contributions far from 0, so agreement means something."""
    model, processor = load_zoo("default")
    return model.eval(), processor


@pytest.fixture(scope="module")
def data():
    return load_shapes_vqa("train", n=40)


def test_layer_contribution_result_is_labelled_data(untrained, data, tmp_path):
    model, processor = untrained
    result = probes.layer_contribution(model, processor, data, samples=6, seed=1, batch_size=4)
    assert result.lc.dims == ("sample", "layer", "group")
    assert list(result.group.values) == ["visual", "text"] and list(result.layer.values) == list(range(12))
    assert result.sizes["sample"] == 6 and set(result.qtype.values) <= set(data["qtype"])
    assert result.attrs["dataset"] == "shapes-vqa" and result.attrs["seed"] == 1
    assert result.attrs["divergence"] == "kl" and result.attrs["n_layers"] == 12
    again = probes.layer_contribution(model, processor, data, samples=6, seed=1, batch_size=4)
    xr.testing.assert_identical(result, again)
    path = probes.save_result(result, tmp_path / "lc.nc")
    xr.testing.assert_identical(probes.open_result(path, model, "layer_contribution"), result)
    frame = probes.to_frame(result, "lc")
    assert {"sample", "layer", "group", "lc", "qtype"} <= set(frame.columns) and len(frame) == 6 * 12 * 2


def test_layer_and_mode_contribution_in_one_pass_equals_the_two_probes(trained, data, tmp_path):
    model, processor = trained
    settings = dict(samples=6, seed=1, batch_size=4)
    lc, modes = probes.layer_and_mode_contribution(model, processor, data, **settings)
    alone_lc = probes.layer_contribution(model, processor, data, **settings)
    alone_modes = probes.mode_contribution(model, processor, data, **settings)
    xr.testing.assert_identical(lc, alone_lc)
    assert modes.attrs == alone_modes.attrs and list(modes["mode"].values) == ["frozen", "naavit", "composite"]
    for name in ("naavit", "composite"):
        xr.testing.assert_identical(modes.contribution.sel(mode=name), alone_modes.contribution.sel(mode=name))
    # frozen is the visual LC's intervention: the fast path and the row mix agree to rounding
    xr.testing.assert_allclose(modes.contribution.sel(mode="frozen"), alone_modes.contribution.sel(mode="frozen"),
                               rtol=1e-4, atol=1e-6)
    xr.testing.assert_allclose(modes.drop_vars("contribution"), alone_modes.drop_vars("contribution"),
                               rtol=1e-3, atol=1e-5)
    for result, probe in ((lc, "layer_contribution"), (modes, "mode_contribution")):
        path = probes.save_result(result, tmp_path / f"{probe}.nc")
        xr.testing.assert_identical(probes.open_result(path, model, probe), result)
    _, naavit_only = probes.layer_and_mode_contribution(model, processor, data, modes=("naavit",), **settings)
    xr.testing.assert_identical(naavit_only.contribution, alone_modes.contribution.sel(mode=["naavit"]))


def test_interrupted_run_resumes_without_losing_or_repeating_samples(untrained, data, tmp_path, monkeypatch):
    model, processor = untrained
    whole = probes.mode_contribution(model, processor, data, modes=("naavit",), samples=10, batch_size=4)
    real_encode, calls = probes.runner.encode, []

    def crash_on_third(*args):
        calls.append(args[-1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(probes.runner, "encode", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        probes.mode_contribution(model, processor, data, modes=("naavit",), samples=10, batch_size=4,
                                 checkpoint=tmp_path)
    assert len(list(tmp_path.glob("batch-*.nc"))) == 2
    calls.clear()
    resumed = probes.mode_contribution(model, processor, data, modes=("naavit",), samples=10, batch_size=4,
                                       checkpoint=tmp_path)
    assert len(calls) == 1  # only the batch that never finished ran again
    xr.testing.assert_identical(resumed, whole.assign_attrs(resumed.attrs))
    with pytest.raises(probes.CheckpointMismatch, match="seed: 0 there, 5 now.*new checkpoint directory"):
        probes.mode_contribution(model, processor, data, modes=("naavit",), samples=10, seed=5, batch_size=4,
                                 checkpoint=tmp_path)


def test_bad_inputs_say_what_to_do(untrained, data, tmp_path):
    model, processor = untrained
    with pytest.raises(ValueError, match="no column 'question'.*question_column="):
        probes.layer_contribution(model, processor, data.rename_column("question", "prompt"), samples=2)
    with pytest.raises(ValueError, match="has no '<image>'; put it where the image goes"):
        probes.layer_contribution(model, processor, data, samples=2, prompt_template="USER: {question} ASSISTANT:")
    with pytest.raises(ValueError, match="samples must be between 1 and the data set's 40 rows"):
        probes.attention_statistics(model, processor, data, samples=41)
    with pytest.raises(ValueError, match="unknown divergence 'kld'"):
        probes.layer_contribution(model, processor, data, samples=2, divergence="kld")
    result = probes.attention_statistics(model, processor, data, samples=2)
    path = probes.save_result(result, tmp_path / "attention.nc")
    with pytest.raises(probes.ResultMismatch, match="holds a attention_statistics result, not layer_contribution"):
        probes.open_result(path, probe="layer_contribution")
    other = build.build_untrained(0)[0]
    other.config._name_or_path = "someone/another-llava"
    with pytest.raises(probes.ResultMismatch, match="measured on model .* not on 'someone/another-llava'"):
        probes.open_result(path, other)
