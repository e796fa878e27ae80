"""The benchmark spec: which subjects, prompts and seeds an evaluation generates and scores.

    mmdiff-benchmark list --config configs/eval/demo.yaml      # the cases, one a line
    mmdiff-benchmark write-demo outputs/eval/benchmark         # the demo set from scikit-image

Subjects come in the DreamBench layout: a folder with one sub-folder of reference photos per subject
(``<root>/<subject>/00.jpg ...``) and DreamBench's ``prompts_and_classes.txt`` (a ``subject_name,class``
table, then the "Object Prompts" and "Live Subject Prompts" lists of ``'a {0} {1} ...'.format(unique_token,
class_token)`` templates; live subjects are the cats and dogs). Tuning-free models have no unique token:
a template becomes ``a [<class>] in the jungle``, the class word marked as the subject's word.
Multi-subject pairs name two DreamBench subjects and two-slot templates (``a {0} and a {1} on the beach``);
the portrait set is a folder of ``<person>/*.jpg`` with one-slot templates (``a {0} wearing a red hat``).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m evaluation.benchmark`: parse (and answer --help) before the heavy imports below
    import sys

    import evaluation.cli

    sys.exit(evaluation.cli.benchmark())

import argparse
import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field

from evaluation import cli
from mmdiff.configuration import ConfigError, ConfigModel, parse_overrides

__all__ = [
    "BenchmarkSpec",
    "Case",
    "DreamBench",
    "PairSet",
    "PortraitSet",
    "benchmark_hash",
    "list_cases",
    "main",
    "read_dreambench",
    "write_demo",
]

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects get the "Live Subject Prompts"
_TEMPLATE = re.compile(r"'([^']*)'\.format\(\s*unique_token\s*,\s*class_token\s*\)")


class PairSet(ConfigModel):
    subjects: list[tuple[str, str]]  # DreamBench subject names, two per pair
    prompts: list[str]  # templates with {0} and {1}: the pair's class words


class PortraitSet(ConfigModel):
    folder: str  # <folder>/<person>/*.jpg
    class_word: str = "person"
    prompts: list[str]  # templates with {0}: the class word


class BenchmarkSpec(ConfigModel):
    name: str
    dreambench: str | None = None  # folder: <subject>/NN.jpg and prompts_and_classes.txt
    subjects: list[str] | None = None  # None: every subject of the folder
    prompts_per_subject: int | None = Field(None, ge=1)  # None: all 25 DreamBench prompts
    condition_reference: int = 0  # which reference photo conditions generation (the others only score)
    pairs: PairSet | None = None
    portraits: PortraitSet | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    ceiling: bool = True  # also score each subject's references against each other (the ceiling row)


@dataclass(frozen=True)
class Case:
    """One image to score. ``kind``: single | multi | portrait | ceiling (a reference photo, no generation)."""

    case_id: str
    kind: str
    prompt: str  # subject words marked as [word]; empty for ceiling rows
    subjects: list[str]
    condition: list[str]  # per subject: the reference photo that conditions generation
    references: list[list[str]]  # per subject: the photos the result is scored against
    seed: int
    image: str = ""  # ceiling rows: the reference photo scored

    def row(self) -> dict:
        """A flat row of strings and ints (Arrow-friendly for Ray Data)."""
        data = asdict(self)
        for key in ("subjects", "condition", "references"):
            data[key] = json.dumps(data[key])
        return data

    @classmethod
    def from_row(cls, row: dict) -> Case:
        data = {k: row[k] for k in cls.__dataclass_fields__}
        for key in ("subjects", "condition", "references"):
            data[key] = json.loads(data[key])
        data["seed"] = int(data["seed"])
        return cls(**data)


@dataclass(frozen=True)
class DreamBench:
    classes: dict[str, str]  # subject -> class word
    object_prompts: list[str]
    live_prompts: list[str]
    references: dict[str, list[str]]  # subject -> photo paths, sorted

    def prompts(self, subject: str) -> list[str]:
        return self.live_prompts if self.classes[subject] in LIVE_CLASSES else self.object_prompts


def _photos(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_dreambench(root: str | Path) -> DreamBench:
    """Parse a DreamBench folder; errors name the file and the line at fault."""
    root = Path(root)
    path = root / PROMPTS_FILE
    if not path.is_file():
        raise ConfigError(f"{root}: no {PROMPTS_FILE} (the DreamBench subject/class table and prompt lists)")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        lowered = line.lower()
        if lowered == "subject_name,class":
            section = "classes"
        elif lowered.startswith("object prompts"):
            section = "object"
        elif lowered.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in line:
            subject, cls = (part.strip() for part in line.split(",", 1))
            classes[subject] = cls
        elif section == "classes" and line and lowered != "prompts":
            raise ConfigError(f"{path}:{number}: expected 'subject_name,class', got {line!r}")
        elif section in lists and (match := _TEMPLATE.search(line)):
            lists[section].append(match.group(1))
    if not classes:
        raise ConfigError(f"{path}: no 'subject_name,class' table")
    if not lists["object"] or not lists["live"]:
        raise ConfigError(f"{path}: needs both the 'Object Prompts' and the 'Live Subject Prompts' lists")
    references = {}
    for subject in classes:
        folder = root / subject
        photos = _photos(folder) if folder.is_dir() else []
        if not photos:
            raise ConfigError(f"{path}: subject {subject!r} has no photos under {folder}")
        references[subject] = photos
    return DreamBench(classes, lists["object"], lists["live"], references)


def _mark(template: str, words: list[str]) -> str:
    """DreamBench template -> a tuning-free prompt with the class words marked: 'a [cat] in the jungle'."""
    if "{1}" in template and len(words) == 1:  # single-subject DreamBench template: {0} is the unique token
        text = template.format("", f"[{words[0]}]")
    else:
        text = template.format(*(f"[{w}]" for w in words))
    return " ".join(text.split())


def list_cases(spec: BenchmarkSpec, base: str | Path = ".") -> list[Case]:
    """Every case of the benchmark, in a fixed order (paths relative to ``base`` are resolved)."""
    base = Path(base)
    cases: list[Case] = []
    bench = read_dreambench(base / spec.dreambench) if spec.dreambench else None
    if bench is None and (spec.subjects or spec.pairs):
        raise ConfigError(f"benchmark {spec.name}: subjects and pairs need a dreambench folder")
    if bench is not None:
        subjects = spec.subjects if spec.subjects is not None else list(bench.classes)
        pair_subjects = [s for pair in (spec.pairs.subjects if spec.pairs else []) for s in pair]
        unknown = sorted(set(subjects + pair_subjects) - set(bench.classes))
        if unknown:
            raise ConfigError(f"benchmark {spec.name}: subjects {unknown} are not in {spec.dreambench}/{PROMPTS_FILE}")

        def condition(subject: str) -> str:
            photos = bench.references[subject]
            return photos[min(spec.condition_reference, len(photos) - 1)]

        for subject in subjects:
            prompts = bench.prompts(subject)[: spec.prompts_per_subject]
            for p, template in enumerate(prompts):
                for seed in spec.seeds:
                    cases.append(Case(f"single/{subject}/p{p:02d}/s{seed}", "single",
                                      _mark(template, [bench.classes[subject]]), [subject], [condition(subject)],
                                      [bench.references[subject]], seed))
            photos = bench.references[subject]
            if spec.ceiling and len(photos) > 1:
                for i, photo in enumerate(photos):
                    cases.append(Case(f"ceiling/{subject}/r{i:02d}", "ceiling", "", [subject], [],
                                      [[q for q in photos if q != photo]], 0, image=photo))
        for a, b in spec.pairs.subjects if spec.pairs else []:
            for p, template in enumerate(spec.pairs.prompts):
                for seed in spec.seeds:
                    cases.append(Case(f"multi/{a}+{b}/p{p:02d}/s{seed}", "multi",
                                      _mark(template, [bench.classes[a], bench.classes[b]]), [a, b],
                                      [condition(a), condition(b)], [bench.references[a], bench.references[b]], seed))
    if spec.portraits:
        folder = base / spec.portraits.folder
        people = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not people:
            raise ConfigError(f"benchmark {spec.name}: portraits.folder {folder} has no <person>/ folders")
        for person in people:
            photos = _photos(person)
            if not photos:
                raise ConfigError(f"benchmark {spec.name}: portrait {person} has no photos")
            for p, template in enumerate(spec.portraits.prompts):
                for seed in spec.seeds:
                    cases.append(Case(f"portrait/{person.name}/p{p:02d}/s{seed}", "portrait",
                                      _mark(template, [spec.portraits.class_word]), [person.name], [photos[0]],
                                      [photos], seed))
    return cases


def benchmark_hash(cases: list[Case]) -> str:
    """Identifies what was scored (cases and reference bytes): metrics compare only under the same hash."""
    digest = hashlib.sha256()
    files = sorted({f for c in cases for refs in c.references for f in refs} | {c.image for c in cases if c.image})
    for case in cases:
        digest.update(json.dumps({**case.row(), "references": "", "condition": "", "image": ""}, sort_keys=True).encode())
    for path in files:
        digest.update(Path(path).name.encode() + hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:16]


# The demo set: scikit-image photos in the DreamBench layout. Each subject gets its photo and a second view
# of it (a mirrored, tighter crop), so the reference set can also be scored against itself.
DEMO_SUBJECTS = {"cat": ("chelsea", "cat"), "cup": ("coffee", "cup"), "rocket": ("rocket", "rocket")}
DEMO_PORTRAITS = {"astronaut": "astronaut"}
DEMO_OBJECT_PROMPTS = ["a {0} {1} on the beach", "a {0} {1} in the snow"]
DEMO_LIVE_PROMPTS = ["a {0} {1} on the beach", "a {0} {1} wearing a red hat"]


def write_demo(root: str | Path) -> Path:
    """Write the demo benchmark folder (DreamBench layout + a portrait folder) from scikit-image photos."""
    from PIL import ImageOps

    from pipeline.example_inputs import photo

    root = Path(root)
    dataset = root / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    lines = ["Classes", "", "subject_name,class"]
    for subject, (name, cls) in DEMO_SUBJECTS.items():
        lines.append(f"{subject},{cls}")
        image = photo(name)
        (dataset / subject).mkdir(exist_ok=True)
        image.save(dataset / subject / "00.jpg", quality=95)
        w, h = image.size
        view = ImageOps.mirror(image.crop((w // 10, h // 10, w - w // 10, h - h // 10)))
        view.save(dataset / subject / "01.jpg", quality=95)
    lines += ["", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    lines += [f"'{t}'.format(unique_token, class_token)," for t in DEMO_OBJECT_PROMPTS]
    lines += ["]", "", "Live Subject Prompts", "", "prompt_list = ["]
    lines += [f"'{t}'.format(unique_token, class_token)," for t in DEMO_LIVE_PROMPTS]
    lines += ["]", ""]
    (dataset / PROMPTS_FILE).write_text("\n".join(lines), encoding="utf-8")
    for person, name in DEMO_PORTRAITS.items():
        (root / "portraits" / person).mkdir(parents=True, exist_ok=True)
        photo(name).save(root / "portraits" / person / "00.jpg", quality=95)
    return root


def run(args: argparse.Namespace) -> int:
    if args.command == "write-demo":
        print(f"demo benchmark written to {write_demo(args.root)}")
        return 0
    from evaluation.evaluate import load_evaluation_config

    config = load_evaluation_config(args.config, parse_overrides(args.set))
    cases = list_cases(config.benchmark)
    for case in cases:
        print(f"{case.case_id}\t{case.prompt}")
    print(f"{len(cases)} cases, benchmark hash {benchmark_hash(cases)}", file=sys.stderr)
    return 0


main = cli.benchmark  # the command itself (parsed in evaluation/cli.py)
