"""shapes-vqa: a procedurally generated visual question answering benchmark.

Every scene is a 160x160 RGB image holding a 3x3 grid of cells: 2 to 6 cells carry a coloured
shape (each colour/shape pair at most once, so "the red circle" is unambiguous) and one more
cell carries a black rendered character. Each scene has one question of every type:

===========  ==========================================================  ================
qtype        question                                                    answers (chance)
===========  ==========================================================  ================
color_at     What color is the shape at the top left?                    6 colours (1/6)
shape_at     What shape is at the center?                                4 shapes (1/4)
count        How many shapes are there?                                  2..6 (1/5)
relation     Is the red circle left or right of the blue square?         2 options (1/2)
exists       Is there a green triangle in the image?  (POPE-style)       yes/no (1/2)
read         What is written in the image?  (TextVQA-style)              10 characters (1/10)
mc           colour or shape question with lettered options (MMBench)    A-D (1/4)
===========  ==========================================================  ================

Scene ``i`` of a split is drawn from ``numpy.random.SeedSequence([seed, split_id, i])``, so the
same ``(split, seed)`` always gives identical data and the splits never share a scene:

* ``train``: what the default model learned from, and what the probes measure on;
* ``validation``: where plans are *chosen* (tolerance-k, greedy, the policy comparison);
* ``test``: where the chosen plan's final score is *reported*; no choice ever sees it.
Row ``i`` of :func:`load_shapes_vqa` asks scene ``i`` its question of type ``QTYPES[i % 7]``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 160
GRID = 3
CELL = IMAGE_SIZE / GRID
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
CHARACTERS = ("A", "C", "H", "K", "M", "T", "X", "2", "4", "7")
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
QTYPES = ("color_at", "shape_at", "count", "relation", "exists", "read", "mc")
MIN_SHAPES, MAX_SHAPES = 2, 6
SPLITS = {"train": 1, "test": 2, "validation": 3}
"""Split name -> the stream id mixed into every scene seed (so the splits draw disjoint scenes)."""
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MC_LETTERS = "ABCD"

CHANCE: dict[str, float] = {
    "color_at": 1 / len(COLORS),
    "shape_at": 1 / len(SHAPES),
    "count": 1 / (MAX_SHAPES - MIN_SHAPES + 1),
    "relation": 1 / 2,
    "exists": 1 / 2,
    "read": 1 / len(CHARACTERS),
    "mc": 1 / len(MC_LETTERS),
}
"""Accuracy of uniform guessing among the answers a question of each type allows."""

DEFAULT_SIZES = {"train": 70_000, "validation": 1_400, "test": 1_400}


@dataclass(frozen=True)
class Item:
    """One shape or character in a scene: ``cell`` indexes POSITIONS (row-major 3x3 grid)."""

    cell: int
    color: str  # "black" for a character
    shape: str  # a SHAPES entry, or the character itself


@dataclass(frozen=True)
class Question:
    qtype: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    cells: tuple[int, ...] = ()  # grid cells the question is about, in the order it names them


@dataclass(frozen=True)
class Scene:
    """A rendered scene with its objects; ``image`` is ``[160, 160, 3]`` uint8."""

    shapes: tuple[Item, ...]
    character: Item
    image: np.ndarray
    questions: tuple[Question, ...]

    def cell_labels(self) -> np.ndarray:
        """Per-cell content ids ``[9]``: 0 empty, 1.. colour-shape pairs, then characters."""
        labels = np.zeros(GRID * GRID, dtype=np.int64)
        for item in self.shapes:
            labels[item.cell] = 1 + list(COLORS).index(item.color) * len(SHAPES) + SHAPES.index(item.shape)
        labels[self.character.cell] = 1 + len(COLORS) * len(SHAPES) + CHARACTERS.index(self.character.shape)
        return labels


N_CELL_LABELS = 1 + len(COLORS) * len(SHAPES) + len(CHARACTERS)


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=40)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _render(shapes: tuple[Item, ...], character: Item, rng: np.random.Generator) -> np.ndarray:
    background = tuple(int(v) for v in rng.integers(235, 256, size=3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for item in shapes:
        row, col = divmod(item.cell, GRID)
        cx = (col + 0.5) * CELL + rng.uniform(-5, 5)
        cy = (row + 0.5) * CELL + rng.uniform(-5, 5)
        radius = rng.uniform(14, 20)
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[item.color], jitter))
        _draw_shape(draw, item.shape, cx, cy, radius, fill)
    row, col = divmod(character.cell, GRID)
    cx = (col + 0.5) * CELL + rng.uniform(-4, 4)
    cy = (row + 0.5) * CELL + rng.uniform(-4, 4)
    draw.text((cx, cy), character.shape, fill=(0, 0, 0), font=_font(), anchor="mm")
    return np.asarray(image)


def _name(item: Item) -> str:
    return f"{item.color} {item.shape}"


def _relation_question(shapes: tuple[Item, ...], rng: np.random.Generator) -> Question:
    i, j = rng.choice(len(shapes), size=2, replace=False)
    a, b = shapes[i], shapes[j]
    (ra, ca), (rb, cb) = divmod(a.cell, GRID), divmod(b.cell, GRID)
    axes = [axis for axis, differs in (("horizontal", ca != cb), ("vertical", ra != rb)) if differs]
    if rng.choice(axes) == "horizontal":
        answer = "left" if ca < cb else "right"
        return Question("relation", f"Is the {_name(a)} left or right of the {_name(b)}?", answer,
                        cells=(a.cell, b.cell))
    answer = "above" if ra < rb else "below"
    return Question("relation", f"Is the {_name(a)} above or below the {_name(b)}?", answer,
                    cells=(a.cell, b.cell))


def _exists_question(shapes: tuple[Item, ...], rng: np.random.Generator) -> Question:
    present = {(s.color, s.shape) for s in shapes}
    if rng.random() < 0.5:
        item = shapes[rng.integers(len(shapes))]
        return Question("exists", f"Is there a {item.color} {item.shape} in the image?", "yes", cells=(item.cell,))
    # Half of the negatives are adversarial (POPE-style): they share a colour or a shape with the scene.
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if rng.random() < 0.5:
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        absent = near or absent
    color, shape = absent[rng.integers(len(absent))]
    return Question("exists", f"Is there a {color} {shape} in the image?", "no")


def _mc_question(shapes: tuple[Item, ...], rng: np.random.Generator, from_scene: bool = False) -> Question:
    """A lettered colour or shape question about one shape; ``from_scene``: its wrong options are the
    colours (or shapes) of the scene's other shapes first, the rest drawn as usual (training only)."""
    item = shapes[rng.integers(len(shapes))]
    position = POSITIONS[item.cell]
    attribute = "color" if rng.random() < 0.5 else "shape"
    if attribute == "color":
        stem, truth, pool = f"What color is the shape at the {position}?", item.color, list(COLORS)
    else:
        stem, truth, pool = f"What shape is at the {position}?", item.shape, list(SHAPES)
    distractors = [p for p in pool if p != truth]
    if from_scene:
        elsewhere = {getattr(s, attribute) for s in shapes if s is not item}
        drawn = sorted(rng.permutation(len(distractors)), key=lambda k: distractors[k] not in elsewhere)[:3]
    else:
        drawn = rng.choice(len(distractors), size=3, replace=False)
    options = [truth, *(distractors[k] for k in drawn)]
    order = rng.permutation(4)
    choices = tuple(options[k] for k in order)
    lines = [stem, *(f"{MC_LETTERS[k]}. {c}" for k, c in enumerate(choices)), MC_INSTRUCTION]
    return Question("mc", "\n".join(lines), MC_LETTERS[choices.index(truth)], choices, cells=(item.cell,))


_DRAWN = {"relation": _relation_question, "exists": _exists_question, "mc": _mc_question}
REDRAWN_QTYPES = tuple(_DRAWN)
"""Question types :func:`another_question` can draw again for a scene (the others have one answer per scene)."""


def another_question(scene: Scene, qtype: str, rng: np.random.Generator, mc_from_scene: bool = False) -> Question:
    """A fresh question of ``qtype`` (one of :data:`REDRAWN_QTYPES`) about ``scene``, drawn from ``rng``;
    ``mc_from_scene``: an ``mc`` question's wrong options come from the scene's other shapes first."""
    if qtype not in _DRAWN:
        raise ValueError(f"cannot draw another {qtype!r} question; choose one of {REDRAWN_QTYPES}")
    if qtype == "mc":
        return _mc_question(scene.shapes, rng, from_scene=mc_from_scene)
    return _DRAWN[qtype](scene.shapes, rng)


def asks(question: Question) -> tuple[int, str] | None:
    """``(cell, "color" | "shape")`` when ``question`` asks one attribute of the shape in one cell, else None."""
    if question.qtype in ("color_at", "shape_at"):
        return question.cells[0], question.qtype.removesuffix("_at")
    if question.qtype == "mc":
        return question.cells[0], "color" if question.question.startswith("What color") else "shape"
    return None


def conversation(scene: Scene, extra: dict[str, int], rng: np.random.Generator, tries: int = 20,
                 mc_from_scene: bool = False) -> list[Question]:
    """The scene's questions plus ``extra[qtype]`` more of each redrawn type, in an order drawn from ``rng``
    in which no multiple-choice turn can be answered by copying an earlier turn.

    A further ``mc`` question is drawn again (up to ``tries`` times) while it asks what another ``mc``
    turn asks, and each ``mc`` turn goes before the ``color_at``/``shape_at`` turn that asks the same
    cell's same attribute (they swap places), so the letter has to come from the image: the benchmark
    asks ``mc`` on its own. ``mc_from_scene``: every ``mc`` turn (the scene's own drawn again) takes its
    wrong options from the scene's other shapes first, so that picking any option the image shows pays
    less (about 38% of the turns instead of the benchmark's 45%; a scene with few shapes cannot supply
    more): the cell the question names has to be read.
    """
    questions = [another_question(scene, "mc", rng, mc_from_scene=True) if mc_from_scene and q.qtype == "mc" else q
                 for q in scene.questions]
    mc_asked = {asks(q) for q in questions if q.qtype == "mc"}
    for qtype, n in extra.items():
        for _ in range(n):
            question = another_question(scene, qtype, rng, mc_from_scene)
            for _ in range(tries if qtype == "mc" else 0):
                if asks(question) not in mc_asked:
                    break
                question = another_question(scene, qtype, rng, mc_from_scene)
            if qtype == "mc":
                mc_asked.add(asks(question))
            questions.append(question)
    order = [questions[i] for i in rng.permutation(len(questions))]
    for k, question in enumerate(order):
        if question.qtype == "mc":
            earlier = next((j for j in range(k) if order[j].qtype != "mc" and asks(order[j]) == asks(question)), None)
            if earlier is not None:
                order[earlier], order[k] = order[k], order[earlier]
    return order


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw, render and question one scene from ``rng``."""
    n_shapes = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    cells = rng.permutation(GRID * GRID)[: n_shapes + 1]
    pairs = rng.permutation(len(COLORS) * len(SHAPES))[:n_shapes]
    shapes = tuple(
        Item(int(cell), list(COLORS)[p // len(SHAPES)], SHAPES[p % len(SHAPES)])
        for cell, p in zip(cells[:n_shapes], pairs)
    )
    character = Item(int(cells[-1]), "black", CHARACTERS[rng.integers(len(CHARACTERS))])
    image = _render(shapes, character, rng)

    target = shapes[rng.integers(n_shapes)]
    shape_target = shapes[rng.integers(n_shapes)]
    questions = (
        Question("color_at", f"What color is the shape at the {POSITIONS[target.cell]}?", target.color,
                 cells=(target.cell,)),
        Question("shape_at", f"What shape is at the {POSITIONS[shape_target.cell]}?", shape_target.shape,
                 cells=(shape_target.cell,)),
        Question("count", "How many shapes are there?", str(n_shapes)),
        _relation_question(shapes, rng),
        _exists_question(shapes, rng),
        Question("read", "What is written in the image?", character.shape, cells=(character.cell,)),
        _mc_question(shapes, rng),
    )
    return Scene(shapes, character, image, questions)


def scene_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``; disjoint streams per split and seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; shapes-vqa has splits {sorted(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))


def normalize_answer(text: str) -> str:
    """Lower-case, strip whitespace and surrounding punctuation (the exact-match normalisation)."""
    return text.strip().strip(string.punctuation + " ").lower()


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`; for lettered options only the letter counts."""
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy(qtypes: Sequence[str], predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per question type, plus ``"overall"`` over all rows."""
    hits: dict[str, list[bool]] = {}
    for qtype, pred, truth in zip(qtypes, predictions, answers, strict=True):
        hits.setdefault(qtype, []).append(exact_match(pred, truth))
    result = {q: float(np.mean(v)) for q, v in sorted(hits.items())}
    result["overall"] = float(np.mean([h for v in hits.values() for h in v]))
    return result


def load_shapes_vqa(split: str = "test", n: int | None = None, seed: int = 0, start: int = 0) -> datasets.Dataset:
    """Generate the shapes-vqa ``split`` ("train", "validation" or "test") as a ``datasets.Dataset``.

    Columns: ``image`` (PIL, 160x160 RGB), ``question``, ``answer``, ``qtype``, ``choices``
    (the lettered options of ``mc`` rows, empty otherwise) and ``id`` (``"{split}-{seed}-{i}"``).
    ``n`` rows (default: 70,000 train, 1,400 validation, 1,400 test), question types in rotation;
    the same ``(split, n, seed)`` always returns identical rows, and no two splits share a scene.
    ``start``: the rows ``start .. start + n - 1`` of that sequence (a streaming reader takes one
    range at a time). Choose plans on ``validation`` and report their scores on ``test``.
    """
    size = DEFAULT_SIZES[split] if n is None and split in DEFAULT_SIZES else n
    scene_rng(split, 0, seed)  # validates the split name before any work
    if size is None or size < 0:
        raise ValueError(f"n must be a non-negative number of rows, got {n!r}")
    if start < 0:
        raise ValueError(f"start must be a non-negative row number, got {start}")

    def rows():
        for i in range(start, start + size):
            scene = make_scene(scene_rng(split, i, seed))
            q = scene.questions[i % len(QTYPES)]
            yield {
                "id": f"{split}-{seed}-{i}",
                "image": Image.fromarray(scene.image),
                "question": q.question,
                "answer": q.answer,
                "qtype": q.qtype,
                "choices": list(q.choices),
            }

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
        }
    )
    info = datasets.DatasetInfo(dataset_name="shapes-vqa", description=f"shapes-vqa {split} split, seed {seed}",
                                features=features)
    records = list(rows())
    if not records:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features, info=info, split=split)
    return datasets.Dataset.from_list(records, features=features, info=info, split=split)
