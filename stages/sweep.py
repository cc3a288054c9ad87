"""Sweeps: a search space in DVC's `-S` syntax, an Optuna study, and the link from a trial's
training back to that study (its val mIoU reported, pruning asked).

The space is Hydra's override grammar, which `dvc exp run -S` parses too:

    -S 'train.lr=0.02,0.05,0.1'                    a choice (a grid axis)
    -S 'train.batch_size=range(4,16,4)'            4, 8, 12
    -S 'train.crop_size=choice([96,96],[128,128])'
    -S 'train.lr=interval(0.001,0.1)'              continuous (random and TPE only)
    -S 'train.lr=tag(log, interval(0.001,0.1))'    on a log scale
    -S 'train.seed=1'                              a fixed override of every trial

Every value is kept as the text a trial's `-S` override carries ("[96, 96]"), so a grid of
lists is a grid Optuna's GridSampler can walk (it takes scalars only); intervals are Optuna's
float (or int) distributions. The study lives in Optuna's storage: a journal file on one host
(the default, in the project's `.dvc/tmp/seg/`), PostgreSQL for several
(`--storage postgresql+psycopg://user@host/db`), which every host's trials reach.

Nothing here talks to Prefect (stages/sweep_flow.py does).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError, SegError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
MAX_GRID = 256
METRIC = "val mIoU"


class Pruned(SegError):
    """The sweep's pruner stopped this trial's training (not a failure)."""


@dataclass(frozen=True)
class Dim:
    """One searched param: `choices` (override texts), or an interval (low, high, log, int)."""

    name: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def interval(self) -> bool:
        return self.low is not None


@dataclass(frozen=True)
class Space:
    dims: tuple[Dim, ...]
    fixed: tuple[str, ...] = ()  # overrides every trial carries

    def grid(self) -> list[dict[str, str]]:
        """Every point of the grid, in the order the axes were given."""
        if any(d.interval for d in self.dims):
            names = ", ".join(d.name for d in self.dims if d.interval)
            raise ConfigError(f"{names}: interval() has no grid: use --sampler random or tpe")
        names = [d.name for d in self.dims]
        return [dict(zip(names, p, strict=True)) for p in itertools.product(
            *(d.choices for d in self.dims))]  # fmt: skip

    def grid_size(self) -> int:
        return math.prod(len(d.choices) for d in self.dims) if self.dims else 0

    def distributions(self) -> dict:
        """Optuna's distributions, one per dim."""
        import optuna.distributions as od

        out = {}
        for d in self.dims:
            if not d.interval:
                out[d.name] = od.CategoricalDistribution(list(d.choices))
            elif d.integer:
                out[d.name] = od.IntDistribution(int(d.low), int(d.high), log=d.log)
            else:
                out[d.name] = od.FloatDistribution(d.low, d.high, log=d.log)
        return out

    def overrides(self, params: dict) -> list[str]:
        """A trial's `-S` overrides: the fixed ones, then its point."""
        return [*self.fixed, *(f"{k}={_text(v)}" for k, v in params.items())]

    def as_dict(self) -> dict:
        return {"dims": [asdict(d) for d in self.dims], "fixed": list(self.fixed)}

    @classmethod
    def from_dict(cls, data: dict) -> Space:
        dims = tuple(Dim(**{**d, "choices": tuple(d["choices"])}) for d in data["dims"])
        return cls(dims, tuple(data["fixed"]))


def _text(value) -> str:
    """A value as an override's text (YAML flow style: what `-S` parses back)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(f"{value:.12g}"))
    return json.dumps(value)


def _current(params_file: Path | str, key: str):
    """params.yaml's value at `key` (section.name), None where there is none."""
    from stages import steps

    node = steps.load(params_file).to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if isinstance(node, bool) else node


def parse_space(sets: list[str], params_file: Path | str = "params.yaml") -> Space:
    """`-S` items -> Space, each checked (a malformed item, an unknown param, an empty axis:
    one line each); every value is tried against params.yaml's validation."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    from stages import steps

    parser = OverridesParser.create()
    dims, fixed, seen, probes = [], [], set(), []
    for item in sets:
        try:
            o = parser.parse_override(item)
        except HydraException as exc:
            raise ConfigError(f"-S {item!r}: malformed ({str(exc).splitlines()[0]})") from None
        key = o.key_or_group
        if key in seen:
            raise ConfigError(f"-S {key}: given twice")
        seen.add(key)
        value = o.value()
        if isinstance(value, IntervalSweep):
            low, high = value.start, value.end
            if not low < high or ("log" in value.tags and low <= 0):
                raise ConfigError(f"-S {item!r}: an interval needs low < high (> 0 with log)")
            # Hydra gives floats; an int param (params.yaml's type) searches whole numbers
            integer = isinstance(_current(params_file, key), int)
            if integer:
                low, high = math.ceil(low), math.floor(high)
            dims.append(Dim(key, low=low, high=high, log="log" in value.tags, integer=integer))
            probe = [f"{key}={_text(low)}"]
        elif isinstance(value, ChoiceSweep | RangeSweep):
            choices = tuple(_text(v) for v in o.sweep_iterator())
            if not choices:
                raise ConfigError(f"-S {item!r}: an empty axis (no value to try)")
            dims.append(Dim(key, choices=choices))
            probe = [f"{key}={c}" for c in choices]
        elif o.is_sweep_override():
            raise ConfigError(f"-S {item!r}: not a sweep this command knows")
        else:
            fixed.append(item)
            probe = [item]
        probes += probe
    for p in probes:  # an unknown key or an impossible value: now, not in a trial
        steps.load(params_file, [*fixed, p])  # with every fixed one, wherever it was given
    if not dims:
        raise ConfigError("nothing to sweep: give at least one -S with several values")
    return Space(tuple(dims), tuple(fixed))


# ----------------------------------------------------------------------------- the study


@dataclass
class Settings:
    """What a sweep is: kept in the study (its user attributes), so that a rerun under the same
    name continues the same sweep."""

    space: dict
    sampler: str
    prune: str
    trials: int
    commit: str
    seed: int = 0
    timeout: float | None = None
    metric: str = METRIC
    extra: dict = field(default_factory=dict)


def default_storage(root: Path) -> str:
    """One host's storage: a journal file in the project (git ignores .dvc/tmp)."""
    path = root.resolve() / ".dvc" / "tmp" / "seg" / "optuna.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"journal:{path}"


def storage(url: str):
    """Optuna's storage for `url`: `journal:PATH` (a file, one host), or an RDB URL
    (postgresql+psycopg://..., sqlite:///...), which Optuna opens itself."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url, heartbeat_interval=None)


def pruner(kind: str, iterations: int | None = None, val_interval: int | None = None):
    """`median`: a trial below the median of the others at the same step stops (after 2
    trials and one validation); `hyperband`: budgets from one validation to the whole run."""
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=val_interval or 1, max_resource=iterations or "auto", reduction_factor=3
        )
    raise ConfigError(f"--prune {kind!r}: valid: {', '.join(PRUNERS)}")


def sampler(kind: str, space: Space, seed: int):
    import optuna

    if kind == "grid":
        grid = {d.name: list(d.choices) for d in space.dims}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, 10))
    raise ConfigError(f"--sampler {kind!r}: valid: {', '.join(SAMPLERS)}")


def check_budget(kind: str, space: Space, trials: int | None, max_grid: int) -> int:
    """The number of trials a sweep hands out; bad combinations fail in one line."""
    if kind not in SAMPLERS:
        raise ConfigError(f"--sampler {kind!r}: valid: {', '.join(SAMPLERS)}")
    if kind == "grid":
        size = len(space.grid())
        if size > max_grid:
            raise ConfigError(
                f"the grid has {size} points, more than --max-grid {max_grid}: narrow it, or "
                "raise --max-grid"
            )
        return min(size, trials) if trials else size
    if not trials:
        raise ConfigError(f"--sampler {kind} needs --trials N (how many trials to run)")
    return trials


# ----------------------------------------------------------------------------- a trial's link


@dataclass(frozen=True)
class TrialLink:
    """What a trial's training needs to talk to its study (SEG_TRIAL, set by the sweep for the
    trial's stages): report val mIoU at each validation, ask whether to stop."""

    storage: str
    study: str
    trial_id: int
    number: int
    prune: str
    iterations: int | None = None
    val_interval: int | None = None

    ENV = "SEG_TRIAL"

    def to_env(self) -> dict[str, str]:
        return {self.ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> TrialLink | None:
        text = os.environ.get(cls.ENV)
        return cls(**json.loads(text)) if text else None

    def _trial(self):
        import optuna

        study = optuna.load_study(
            study_name=self.study, storage=storage(self.storage),
            pruner=pruner(self.prune, self.iterations, self.val_interval),
        )  # fmt: skip
        return optuna.trial.Trial(study, self.trial_id)

    def report(self, step: int, miou: float) -> bool:
        """Report val mIoU at `step`; True when the pruner says stop."""
        trial = self._trial()
        trial.report(float(miou), step)
        return self.prune != "none" and trial.should_prune()
