"""CBD: Class-Balanced Distillation (Iscen et al., BMVC 2021).

Checked against the official TF2 code (google-research ``class_balanced_distillation``:
``train.py``, ``resnet.py``, ``configs/stage_*``):

* **Stage 1 (teachers).** Each teacher is an ordinary engine run (method ``"ce"``, instance
  sampling) of the same model entry as a single network with a cosine classifier (fixed
  scale 20, no bias) straight on the pooled feature (no projection neck). Teachers differ by
  seed and by SimCLR colour jitter (augmentation ``"simclr_jitter:S"``; the official code's
  strength S is 1.0: ``simclr_data.color_jitter(strength=1.0)``). Teacher ``i`` lives
  in ``<run_dir>/teachers/t<i>/`` (its own ``checkpoint.pt``, ``results.json``, ``model/``).
* **Teacher feature.** Each teacher's pooled feature (``expert.body`` output) is
  L2-normalised, the T features are concatenated (teacher order) and the result is
  L2-normalised again, so each teacher's block has norm ``1/sqrt(T)``.
* **Stage 2 (student).** Trained from scratch with class-balanced sampling; its feature
  is pooled -> Dense(d_teacher) + ReLU + L2 (the model's ``ProjectionNeck``) -> cosine
  classifier. Loss ``(1 - alpha) * CE + alpha * beta * mean(1 - cos(f_student, f_teacher))``.

The two stages are the method's ``stages = ("teachers", "student")``; a recipe may run
only some of them (``stages = ["teachers"]``). The engine trains the "teachers" stage
first, one engine run per teacher (:meth:`CBD.stage_runs`,
:meth:`training.engine.Trainer.run_stage`), so resuming is stage by stage: a teacher whose
``model/`` exists is kept (after checking that its recorded run config matches the one
derived now), an interrupted teacher resumes from its own ``checkpoint.pt``, a missing one
is trained; then the engine seeds, builds and resumes (or starts) the student from
``<run_dir>/checkpoint.pt``, so the student's random stream does not depend on whether the
teachers were trained in this process or earlier. :meth:`CBD.prepare` loads the trained
teachers into the student method; the student's checkpoints carry a sha256 of the teachers'
weights (``teacher_digest``), and resuming with other teachers is refused.

Teacher features are computed **live**, under ``torch.no_grad`` with the teachers in eval
mode, on the very same augmented batch the student sees. We deliberately do not cache them:
the training augmentation (random crop / flip) draws a new view of every image each epoch,
and the student must match the teachers' feature *of that view*; features cached once from
un-augmented images would distil a different view. Caching would only be exact with no
augmentation at all (``data.augment = []``), and even then the engine hands a method only
``(images, labels)``, not dataset indices, so a cache would need image hashing or an engine
change; the teacher forward pass costs about T/3 of a student step (no backward), so we
chose not to offer caching.

Teachers are frozen (``requires_grad=False``, eval mode forever) and are *not* registered
sub-modules: they are out of the optimiser, out of ``state_dict()`` (so out of the student's
checkpoint and of the published :class:`zoo.Ensemble`), yet follow ``.to(device)`` through
:meth:`CBD._apply`. The published model is the student alone; the card lists the teachers
(``config.extra["teachers"]``) and the teachers' test accuracies
(``config.extra["teacher_results"]``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ltzoo.zoo import Ensemble
from ltzoo.zoo.files import CONFIG_NAME, WEIGHTS_NAME, write_json

from ..config import ConfigError, RunConfig, check_same_run
from ..evaluate import accuracy_report, collect_logits
from ..precision import float32_loss
from .base import Method, MethodParams, StageRun

JITTER = "simclr_jitter"
TEACHERS_DIR = "teachers"
ENSEMBLE_RESULTS = "ensemble_results.json"


@dataclass(frozen=True)
class TeacherSpec:
    """One stage-1 teacher: its seed and whether it trains with SimCLR colour jitter (of
    strength ``jitter_strength``)."""

    seed: int = 0
    jitter: bool = False
    jitter_strength: float = 1.0

    def describe(self) -> str:
        if not self.jitter:
            return f"seed {self.seed}, no colour jitter"
        return f"seed {self.seed}, with colour jitter (strength {self.jitter_strength:g})"

    def augmentation(self) -> str | None:
        """The ``data.augment`` entry this teacher adds, if any."""
        return f"{JITTER}:{self.jitter_strength:g}" if self.jitter else None


@dataclass
class CBDParams(MethodParams):
    """CBD hyper-parameters (recipe ``[method_params]``).

    Teachers are given either as ``teachers = [{seed = 0, jitter = false}, ...]`` or as
    ``num_teachers`` (seeds 0..T-1) plus an optional ``teacher_jitter`` list of T booleans.
    """

    teachers: list[dict[str, Any]] = field(default_factory=list)
    num_teachers: int = 0
    teacher_jitter: list[bool] = field(default_factory=list)
    #: SimCLR colour-jitter strength of the jitter teachers (the official code's 1.0)
    jitter_strength: float = 1.0
    #: epochs of each teacher run; 0: the student's ``optim.epochs``
    teacher_epochs: int = 0
    alpha: float = 0.4
    beta: float = 100.0
    #: evaluate the teacher ensemble (mean of teacher logits) on the test set once, for the card
    evaluate_teacher_ensemble: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method_params.alpha must be in [0, 1], got {self.alpha}")
        if self.beta < 0:
            raise ConfigError(f"method_params.beta must be >= 0, got {self.beta}")
        if not 0 < self.jitter_strength <= 2.5:
            raise ConfigError(
                f"method_params.jitter_strength must be in (0, 2.5], got {self.jitter_strength}"
            )
        if self.teacher_epochs < 0:
            raise ConfigError("method_params.teacher_epochs must be >= 0 (0: the student's epochs)")
        if self.teachers and (self.num_teachers or self.teacher_jitter):
            raise ConfigError(
                "give either method_params.teachers or num_teachers/teacher_jitter, not both"
            )
        for i, t in enumerate(self.teachers):
            if not isinstance(t, dict) or set(t) - {"seed", "jitter"}:
                raise ConfigError(
                    f"method_params.teachers[{i}] must be a table with keys seed, jitter; got {t!r}"
                )
            if isinstance(t.get("seed", 0), bool) or not isinstance(t.get("seed", 0), int):
                raise ConfigError(f"method_params.teachers[{i}].seed must be an integer")
            if not isinstance(t.get("jitter", False), bool):
                raise ConfigError(f"method_params.teachers[{i}].jitter must be true or false")
        if self.num_teachers < 0:
            raise ConfigError("method_params.num_teachers must be >= 0")
        if self.teacher_jitter and len(self.teacher_jitter) != self.num_teachers:
            raise ConfigError(
                f"method_params.teacher_jitter has {len(self.teacher_jitter)} entries for "
                f"num_teachers={self.num_teachers}"
            )
        if not self.specs():
            raise ConfigError(
                "CBD needs at least one teacher: set method_params.teachers or num_teachers"
            )

    def specs(self) -> list[TeacherSpec]:
        """The teachers, in the order their features are concatenated."""
        if self.teachers:
            return [
                TeacherSpec(
                    int(t.get("seed", 0)), bool(t.get("jitter", False)), self.jitter_strength
                )
                for t in self.teachers
            ]
        jitter = self.teacher_jitter or [False] * self.num_teachers
        return [TeacherSpec(i, bool(j), self.jitter_strength) for i, j in enumerate(jitter)]


def teacher_feature(teachers: Sequence[Ensemble], images: torch.Tensor) -> torch.Tensor:
    """Normalised concatenation of the teachers' L2-normalised pooled features, (B, sum d_t).

    Runs without gradient; call it with the teachers in eval mode.
    """
    with torch.no_grad():
        parts = []
        for t in teachers:
            pooled = t.expert_list[0].body(t.stem(images))
            parts.append(F.normalize(pooled.float(), dim=1))
        return F.normalize(torch.cat(parts, dim=1), dim=1)


@float32_loss
def cbd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    student_feature: torch.Tensor,
    teacher_features: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 - alpha) * CE + alpha * beta * mean(1 - cos)``; returns (loss, ce, mean 1 - cos)."""
    ce = F.cross_entropy(logits.float(), labels)
    cos = (
        F.normalize(student_feature.float(), dim=1) * F.normalize(teacher_features.float(), dim=1)
    ).sum(1)
    distance = (1.0 - cos).mean()
    return (1.0 - alpha) * ce + alpha * beta * distance, ce, distance


def teacher_run_config(cfg: RunConfig, index: int, spec: TeacherSpec, epochs: int = 0) -> RunConfig:
    """The :class:`~training.config.RunConfig` of teacher ``index`` derived from the student's.

    Method "ce" (instance sampling), the same model entry as one network with a cosine
    classifier (scale 20, no bias) and no neck, seed ``spec.seed``, the student's data and
    optimiser settings, plus ``simclr_jitter:S`` when ``spec.jitter``.
    """
    t = copy.deepcopy(cfg)
    t.method = "ce"
    t.method_params = {}
    t.stages = []
    t.model_overrides = {
        **cfg.model_overrides,
        "num_experts": 1,
        "layout": "single",
        "shared_stages": 0,
        "neck_dim": None,
        "head": "cosine",
        "head_bias": False,
        "cosine_scale": 20.0,
        "learn_scale": False,
        "name": f"{cfg.model}-teacher{index}",
        "method": "ce",
        "provenance": f"CBD stage-1 teacher {index} of {cfg.model} ({spec.describe()}): instance "
        "sampling, cross-entropy, cosine classifier (scale 20, no bias) on the pooled feature",
    }
    t.run.seed = spec.seed
    t.run.out = ""
    augment = [a for a in cfg.data.augment if a.split(":")[0].strip().lower() != JITTER]
    t.data.augment = [*augment, jitter] if (jitter := spec.augmentation()) else augment
    if epochs and epochs != cfg.optim.epochs:
        t.optim.epochs = epochs
        t.optim.rescale(cfg.optim.epochs)
    t.validate()
    return t


class CBD(Method):
    """Stage 2 of CBD: class-balanced student distilling frozen teachers' features."""

    name = "cbd"
    Params = CBDParams
    teacher_digest: torch.Tensor
    sampler = "class_balanced"
    stages = ("teachers", "student")

    def __init__(self, model: Ensemble, class_counts: Sequence[int], params: CBDParams) -> None:
        super().__init__(model, class_counts, params)
        self.params: CBDParams = params
        self.specs = params.specs()
        if model.num_experts != 1:
            raise ValueError(
                f"the CBD student is one network; model has {model.num_experts} experts"
            )
        expected = len(self.specs) * model.feature_dim
        if model.config.neck_dim != expected:
            raise ValueError(
                f"CBD: the student's neck_dim ({model.config.neck_dim}) must equal the concatenated "
                f"teacher feature size: {len(self.specs)} teachers x {model.feature_dim}-d "
                f"{model.config.backbone} features = {expected}. Set model_overrides.neck_dim = {expected} "
                "or change the number of teachers."
            )
        # A plain list: not sub-modules, so out of parameters(), state_dict() and the Ensemble.
        self._teachers: list[Ensemble] = []
        # sha256 of the teachers' weights, in the student's checkpoints: a resume checks that
        # the student goes on distilling the teachers it started with
        self.register_buffer("teacher_digest", torch.zeros(32, dtype=torch.uint8))
        self.register_load_state_dict_pre_hook(self._check_teacher_digest)

    # -- teachers ------------------------------------------------------------------------
    @property
    def teachers(self) -> list[Ensemble]:
        return list(self._teachers)

    def set_teachers(self, teachers: Sequence[Ensemble]) -> None:
        """Freeze ``teachers`` (eval mode, no grad) and use them; checks the feature size."""
        if len(teachers) != len(self.specs):
            raise ValueError(f"CBD expects {len(self.specs)} teachers, got {len(teachers)}")
        total = sum(t.feature_dim for t in teachers)
        if total != self.model.config.neck_dim:
            raise ValueError(
                f"CBD: the teachers' concatenated feature size ({total}) differs from the student's "
                f"neck_dim ({self.model.config.neck_dim})"
            )
        device = next(self.model.parameters()).device
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
            t.to(device)
        self._teachers = list(teachers)
        digest = hashlib.sha256()
        for t in teachers:
            t.weights_digest(digest)
        self.teacher_digest.copy_(torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8))

    def _check_teacher_digest(self, module, state_dict, prefix, *args) -> None:
        """Refuse a checkpoint of a student that distilled other teachers (e.g. a teacher
        trained again between an interruption and the resume)."""
        stored = state_dict.get(f"{prefix}teacher_digest")
        if stored is None:  # a checkpoint from before the digest: nothing to compare
            state_dict[f"{prefix}teacher_digest"] = self.teacher_digest.clone()
        elif self._teachers and not torch.equal(stored.cpu(), self.teacher_digest.cpu()):
            raise ValueError(
                "CBD: this student checkpoint was trained with other teacher weights than the "
                f"ones in {TEACHERS_DIR}/ now (a teacher was trained again?); resuming would "
                "switch teachers mid-training. Restore those teachers or start the student anew"
            )

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for t in self._teachers:
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self._teachers:
            t.eval()
        return self

    @classmethod
    def stage_runs(cls, cfg: RunConfig, stage: str) -> list[StageRun]:
        """Stage "teachers": one engine run per teacher, in ``teachers/t<i>``."""
        params = CBDParams.from_dict(cfg.method_params)
        assert isinstance(params, CBDParams) and stage == "teachers", stage
        return [
            StageRun(
                stage,
                f"{TEACHERS_DIR}/t{i}",
                teacher_run_config(cfg, i, spec, params.teacher_epochs),
            )
            for i, spec in enumerate(params.specs())
        ]

    def teacher_dirs(self, run_dir: str | Path) -> list[Path]:
        return [Path(run_dir) / TEACHERS_DIR / f"t{i}" for i in range(len(self.specs))]

    def prepare(self, context: dict[str, Any]) -> None:
        """Load the teachers the "teachers" stage trained, and describe them for the card."""
        trainer, split = context["trainer"], context["split"]
        runs = self.stage_runs(trainer.cfg, "teachers")
        teachers: list[Ensemble] = []
        records: list[dict[str, Any]] = []
        for i, (spec, run) in enumerate(zip(self.specs, runs, strict=True)):
            tdir = Path(trainer.run_dir) / run.subdir
            check_same_run(tdir, run.config)
            if not (tdir / "model" / CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"CBD: teacher t{i} is not trained ({tdir / 'model'} is missing); run the "
                    '"teachers" stage first (stages = ["teachers", "student"])'
                )
            if not (tdir / "run.json").is_file():  # what check_same_run compares against
                raise FileNotFoundError(
                    f"CBD: teacher t{i} in {tdir} has no run.json, so what it was trained with "
                    f'cannot be checked against this recipe; delete {tdir} and run the "teachers" '
                    "stage again"
                )
            teachers.append(Ensemble.from_pretrained(tdir / "model"))
            records.append(self._record(i, spec, run.config, tdir, trainer.run_dir))
        self.set_teachers(teachers)
        results: dict[str, Any] = {
            "teachers": [{k: v for k, v in r.items() if k != "line"} for r in records],
        }
        if self.params.evaluate_teacher_ensemble:
            results["ensemble"] = self._ensemble_results(split, trainer)
        extra = {
            **self.model.config.extra,
            "teachers": [r["line"] for r in records],
            "teacher_results": results,
        }
        self.model.config = replace(self.model.config, extra=extra)

    @staticmethod
    def _record(index: int, spec: TeacherSpec, tcfg, tdir: Path, run_dir: Path) -> dict[str, Any]:
        results_path = tdir / "results.json"
        top1 = top1_bal = None
        if results_path.is_file():
            res = json.loads(results_path.read_text())
            top1 = res.get("accuracy", {}).get("top1")
            top1_bal = res.get("accuracy_balanced_prior", {}).get("top1")
        try:
            rel = str((tdir / "model").relative_to(run_dir))
        except ValueError:
            rel = str(tdir / "model")
        acc = (
            f"test top-1 {top1:.2f}% (balanced prior {top1_bal:.2f}%)"
            if top1 is not None and top1_bal is not None
            else "test top-1 not recorded"
        )
        line = f"t{index}: {spec.describe()}, {tcfg.optim.epochs} epochs, instance sampling; {acc}; `{rel}`"
        return {
            "index": index,
            "seed": spec.seed,
            "jitter": spec.jitter,
            "jitter_strength": spec.jitter_strength if spec.jitter else None,
            "epochs": tcfg.optim.epochs,
            "path": rel,
            "top1": top1,
            "top1_balanced_prior": top1_bal,
            "line": line,
        }

    def _ensemble_results(self, split, trainer) -> dict[str, Any]:
        """Test accuracy of the mean of the teachers' logits (cached in teachers/ensemble_results.json)."""
        cache = Path(trainer.run_dir) / TEACHERS_DIR / ENSEMBLE_RESULTS
        weights = [d / "model" / WEIGHTS_NAME for d in self.teacher_dirs(trainer.run_dir)]
        if cache.is_file() and all(
            w.is_file() and w.stat().st_mtime <= cache.stat().st_mtime for w in weights
        ):
            stored = json.loads(cache.read_text())
            if stored.get("num_teachers") == len(self._teachers):
                return stored
        test = split.test
        subset = trainer.cfg.run.eval_subset  # as the engine subsamples the test set
        if subset:
            from torch.utils.data import Subset

            step = max(1, len(test) // subset)
            test = Subset(test, range(0, len(test), step)[:subset])
        logits, labels = None, None
        for t in self._teachers:
            z, labels = collect_logits(t, test, trainer.cfg.run.eval_batch_size, trainer.device)
            logits = z.mean(0) if logits is None else logits + z.mean(0)
            t.eval()
        assert logits is not None and labels is not None
        logits = logits / len(self._teachers)
        shift = self._teachers[0].prior_shift("balanced")
        out = {
            "num_teachers": len(self._teachers),
            "num_test_images": len(test),
            "top1": accuracy_report(logits, labels, split.class_counts)["top1"],
            "top1_balanced_prior": accuracy_report(logits + shift, labels, split.class_counts)[
                "top1"
            ],
        }
        if trainer.dist.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, out)  # atomic: other ranks may read it
        return out

    # -- stage 2 -------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not self._teachers:
            raise RuntimeError(
                "CBD has no teachers: the engine calls prepare(); or call set_teachers()"
            )
        target = teacher_feature(self._teachers, images)
        expert = self.model.expert_list[0]
        feature = expert.forward_features(self.model.stem(images))
        logits = expert.classifier(feature)
        loss, ce, distance = cbd_loss(
            logits, labels, feature, target, self.params.alpha, self.params.beta
        )
        return loss, {"ce": ce.item(), "feat_distill": distance.item()}


__all__ = ["CBD", "CBDParams", "TeacherSpec", "cbd_loss", "teacher_feature", "teacher_run_config"]
