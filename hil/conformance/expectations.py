"""Expectation profiles: which report codes a conforming device sends for each outcome.

The default profile (``fixtures/expectations/onenet.yaml``) follows the user's API document; a
product overrides the outcomes where its firmware documents another policy, in a file that
``extends`` the default (or another profile beside it)::

    extends: onenet
    outcomes:
      retries-timeout: {phase: download, codes: [207]}

A profile may also set an energy budget per phase, in mA·s (milliamp-seconds), checked on rigs
whose supply measures current (``hil.conformance.energy``); a phase over its budget fails the
test, naming the phase, what it drew and the budget::

    energy_budget_mas: {download: 400, flash: 150}

Every mistake is one line naming the file and the key, as rig and task files do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from hil.configfile import STRICT, load_model
from hil.errors import ConfigError
from hil.onenet.codes import ResultCode

Phase = Literal["detect", "token", "download", "verify", "flash", "report"]
Code = Annotated[int, Field(strict=True)]
# The phases an energy curve is cut into (hil.conformance.energy.ENERGY_PHASES).
EnergyPhase = Literal["detect", "download", "verify", "flash", "report"]
Charge = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Outcome(BaseModel):
    model_config = STRICT

    phase: Phase
    codes: tuple[Code, ...]                 # what the service must accept, in order
    sent: tuple[Code, ...] | None = None    # everything the device may send (default: codes)

    @field_validator("codes", "sent")
    @classmethod
    def _result_codes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        known = {int(code) for code in ResultCode}
        for code in value or ():
            if code not in known:
                raise ValueError(f"{code} is not a OneNET result code")
        return value

    @property
    def sent_codes(self) -> tuple[int, ...]:
        return self.codes if self.sent is None else self.sent


class _ProfileFile(BaseModel):
    model_config = STRICT

    name: str | None = None
    extends: str | None = None
    outcomes: dict[str, Outcome] = {}
    energy_budget_mas: dict[EnergyPhase, Charge] = {}


class Profile:
    """The outcomes of one profile, overrides applied: ``profile["success"].codes``."""

    def __init__(self, name: str, outcomes: dict[str, Outcome], path: Path,
                 energy_budget: dict[str, float] | None = None) -> None:
        self.name = name
        self.outcomes = outcomes
        self.path = path
        self.energy_budget: dict[str, float] = dict(energy_budget or {})   # mA·s per phase

    def __getitem__(self, outcome: str) -> Outcome:
        try:
            return self.outcomes[outcome]
        except KeyError:
            raise ConfigError(str(self.path), f"outcomes.{outcome}: not in profile "
                              f"{self.name} (it has {', '.join(self.outcomes)})") from None


def load_profile(path: Path, _seen: tuple[Path, ...] = ()) -> Profile:
    """A profile file, with what it ``extends`` (a name beside it, or a path) under it."""
    if path.resolve() in _seen:
        raise ConfigError(str(path), "extends: the profiles extend each other in a circle")
    raw = load_model(_ProfileFile, path)
    name = raw.name or path.stem
    if raw.extends is None:
        return Profile(name, dict(raw.outcomes), path, _budget(raw))
    base_path = Path(raw.extends)
    if base_path.suffix not in (".yaml", ".yml"):
        base_path = base_path.with_name(f"{base_path.name}.yaml")
    base_path = path.parent / base_path     # relative to the overriding file (absolute stays)
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends", f"no profile {raw.extends!r} ({base_path})")
    base = load_profile(base_path, (*_seen, path.resolve()))
    unknown = sorted(set(raw.outcomes) - set(base.outcomes))
    if unknown:
        raise ConfigError(f"{path}: outcomes.{unknown[0]}",
                          f"not an outcome of {base.name} (it has {', '.join(base.outcomes)})")
    return Profile(name, {**base.outcomes, **raw.outcomes}, path,
                   {**base.energy_budget, **_budget(raw)})


def _budget(raw: _ProfileFile) -> dict[str, float]:
    return {str(phase): charge for phase, charge in raw.energy_budget_mas.items()}
