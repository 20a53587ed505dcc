import numpy as np
import pytest
import torch

from eemllm_models.generation import build_prompt
from eemllm_models.zoo import build, shapes_vqa
from eemllm_models.zoo.train import (
    ABSENT,
    GATHER_LAYER,
    LETTER_LAYER,
    LOOKUP_LAYER,
    MATCH_LAYER,
    TAPPED,
    AuxHeads,
    Encoder,
    Taps,
    _patch_cells,
    _pixel_values,
    guide_loss,
    readout_loss,
)


@pytest.fixture(scope="module")
def processor():
    return build.build_processor()


def test_first_turn_of_a_training_sequence_is_the_benchmark_prompt(processor):
    encoder = Encoder(processor, n_image_tokens=100)
    scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", 0))
    ids, labels, turns = encoder.sequence(scene, np.random.default_rng(0))
    first_answer = next(i for i, label in enumerate(labels) if label != -100)
    first_question = next(q for q in scene.questions if q.answer == processor.tokenizer.decode(ids[first_answer]))
    prompt = processor(images=[scene.image], text=[build_prompt(processor, first_question.question)])
    assert ids[:first_answer] == prompt["input_ids"][0]
    assert len(turns) == len(scene.questions)
    for turn in turns:  # each turn's answer position predicts an answer token
        position = turn.answer_position
        assert labels[position] == -100 and labels[position + 1] == ids[position + 1]


def test_step_targets_name_the_right_words_cells_and_options(processor):
    checked = set()
    for index in range(30):
        scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", index))
        encoder = Encoder(processor, n_image_tokens=100)
        order = np.random.default_rng(index).permutation(len(scene.questions))
        ids, _, turns = encoder.sequence(scene, np.random.default_rng(index))
        words = processor.tokenizer.convert_ids_to_tokens(ids)
        token = processor.tokenizer.convert_ids_to_tokens
        for turn, q in zip(turns, (scene.questions[i] for i in order), strict=True):
            mentioned = [words[p] for p, _ in turn.mentions]
            cells = [c for _, c in turn.mentions]
            if q.qtype in ("relation", "exists"):
                named = [w for w in q.question.rstrip("?").split() if w in shapes_vqa.SHAPES]
                assert mentioned == named
                assert cells == (list(q.cells) if q.cells else [ABSENT])
                checked.add(f"{q.qtype}-{'present' if q.cells else 'absent'}")
            elif q.qtype == "count":
                assert turn.mentions == [] and turn.direct is None
            else:
                assert cells == [q.cells[0]] and mentioned[0] == q.question.split("?")[0].split()[-1]
            if q.qtype in ("color_at", "shape_at", "read", "exists"):
                assert token([turn.direct]) == [q.answer]
            if q.qtype == "mc":
                truth = q.choices["ABCD".index(q.answer)]
                assert token([turn.direct]) == [truth] and token([turn.letter]) == [q.answer]
                assert words[turn.chosen] == truth
                assert [(words[w], words[x]) for w, x in turn.letters] == list(zip(q.choices, "ABCD", strict=True))
            else:
                assert turn.letters == [] and turn.chosen is None
    assert {"exists-present", "exists-absent", "relation-present"} <= checked


def test_pixel_values_match_the_processor(processor):
    scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", 1))
    expected = processor.image_processor(images=[scene.image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(_pixel_values(scene.image[None]), expected)


def test_guides_point_at_the_named_cells_patches_or_at_bos(processor):
    encoder = Encoder(processor, n_image_tokens=100)
    scenes = [shapes_vqa.make_scene(shapes_vqa.scene_rng("train", i)) for i in range(3)]
    batch = encoder.batch(scenes, np.random.default_rng(0))
    patch_cells = _patch_cells()
    lookups = batch["guides"][:, 1] == LOOKUP_LAYER
    assert len(batch["mention_cells"]) == lookups.sum()
    for (b, position, cell), keys in zip(batch["mention_cells"], batch["guide_keys"][lookups], strict=True):
        wanted = keys.nonzero().flatten()
        if cell == ABSENT:
            assert wanted.tolist() == [0]
        else:
            assert (patch_cells[wanted - encoder.image_start] == cell).all()
            assert len(wanted) == (patch_cells == cell).sum()
    queries_before_keys = batch["guide_keys"].float().argmax(1) < batch["guides"][:, 3]
    assert queries_before_keys.all()  # every guide can be met under the causal mask
    assert set(batch["guides"][:, 1].tolist()) == {LETTER_LAYER, LOOKUP_LAYER, GATHER_LAYER, MATCH_LAYER}
    words = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    options = batch["readouts"][batch["readouts"][:, 1] == MATCH_LAYER - 1]
    assert len(options) == 4 * len(scenes)  # every option word must give its letter before matching
    for b, _, position, token in options.tolist():
        assert words[b][position] in {*shapes_vqa.COLORS, *shapes_vqa.SHAPES}
        assert processor.tokenizer.convert_ids_to_tokens(token) == words[b][position - 2] in shapes_vqa.MC_LETTERS


def test_step_losses_are_finite_cross_entropies_with_gradients(processor):
    model, _ = build.build_untrained()
    encoder = Encoder(processor, n_image_tokens=100)
    taps = Taps(model, TAPPED)
    aux = AuxHeads(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    scenes = [shapes_vqa.make_scene(shapes_vqa.scene_rng("train", i)) for i in range(2)]
    batch = encoder.batch(scenes, np.random.default_rng(0))
    model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    taps.remove()
    losses = [
        guide_loss(model, taps, batch["guides"], batch["guide_keys"]),
        readout_loss(model, taps, batch["readouts"]),
        aux.mention_loss(taps.outputs[LOOKUP_LAYER], batch["mention_cells"]),
    ]
    for loss in losses:
        assert torch.isfinite(loss) and 0 < loss.item() < 10
    sum(losses).backward()
    attention = model.model.language_model.layers
    for index in (LETTER_LAYER, LOOKUP_LAYER, GATHER_LAYER, MATCH_LAYER):
        assert attention[index].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_two_stage_run_saves_a_loadable_model_with_its_stages_in_the_card(tmp_path):
    from eemllm_models import load_model
    from eemllm_models.machine import cpu_runs_bf16
    from eemllm_models.zoo.train import finish, train

    first = train(tmp_path / "stage1", steps=2, batch_size=2, eval_every=2, val_rows=7)
    info = train(tmp_path / "stage2", steps=1, batch_size=2, eval_every=1, val_rows=7, lr=5e-4,
                 init_from=tmp_path / "stage1", first_scene=4)
    assert [s["steps"] for s in info["previous_stages"]] == [first["steps"]] and info["first_scene"] == 4
    assert info["bf16_autocast"] is cpu_runs_bf16()  # the default: bf16 only where the CPU has it
    finish(tmp_path / "stage2", info, test_rows=7)
    card = (tmp_path / "stage2" / "README.md").read_text()
    assert "| 2 | `--steps 1 --lr 0.0005 --init-from STAGE1 --first-scene 4` |" in card
    assert "| 1 | `--steps 2 --lr 0.001` |" in card
    model, processor = load_model(tmp_path / "stage2")  # checksums written with the weights
    assert model.config.text_config.num_hidden_layers == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_bf16_is_chosen_by_the_cpu_unless_a_flag_says_otherwise(capsys):
    import argparse

    from eemllm_models.machine import cpu_runs_bf16
    from eemllm_models.zoo.train import add_bf16_flags, autocast_bf16

    parser = argparse.ArgumentParser(prog="train")
    add_bf16_flags(parser)
    assert [parser.parse_args(a).bf16 for a in ([], ["--bf16"], ["--no-bf16"])] == [None, True, False]
    assert [autocast_bf16(v) for v in (None, True, False)] == [cpu_runs_bf16(), True, False]
    with pytest.raises(SystemExit):
        parser.parse_args(["--bf16", "--no-bf16"])
    assert "not allowed with argument" in capsys.readouterr().err
