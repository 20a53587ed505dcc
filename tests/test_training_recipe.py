import numpy as np
import torch

from eemllm_models.generation import build_prompt
from eemllm_models.zoo import build, shapes_vqa
from eemllm_models.zoo.train import EarlyExit, Encoder, GuidedAttention, _patch_cells, _pixel_values


def test_first_turn_of_a_training_sequence_is_the_benchmark_prompt():
    processor = build.build_processor()
    encoder = Encoder(processor, n_image_tokens=100)
    scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", 0))
    ids, labels, targets = encoder.sequence(scene, np.random.default_rng(0))
    first_answer = next(i for i, label in enumerate(labels) if label != -100)
    first_question = next(q for q in scene.questions if q.answer == processor.tokenizer.decode(ids[first_answer]))
    prompt = processor(images=[scene.image], text=[build_prompt(processor, first_question.question)])
    assert ids[:first_answer] == prompt["input_ids"][0]
    assert len(targets) == len(scene.questions)
    assert {t[3] for t in targets} == {0, 1}
    for position, *_ in targets:  # each target is the position that predicts an answer token
        assert labels[position] == -100 and labels[position + 1] == ids[position + 1]


def test_pixel_values_match_the_processor():
    processor = build.build_processor()
    scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", 1))
    expected = processor.image_processor(images=[scene.image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(_pixel_values(scene.image[None]), expected)


def test_guided_attention_loss_is_a_finite_cross_entropy():
    model, processor = build.build_untrained()
    encoder = Encoder(processor, n_image_tokens=100)
    guide = GuidedAttention(model, 2, image_start=3, patch_cells=_patch_cells())
    exits = [EarlyExit(model, 2, single_hop_only=True), EarlyExit(model, 6, single_hop_only=False)]
    scenes = [shapes_vqa.make_scene(shapes_vqa.scene_rng("train", i)) for i in range(2)]
    batch = encoder.batch(scenes, np.random.default_rng(0))
    model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    for loss in (guide.loss(batch["targets"]), *(e.loss(batch["targets"], batch["input_ids"]) for e in exits)):
        assert torch.isfinite(loss) and 0 < loss.item() < 10
