"""A private copy of a simulated rig for tests that run pytest or ``hil sim up`` in another
process: its own name, state directory and probe under ``tmp_path`` (so it never meets the
default rigs' state under $HIL_SIM_ROOT or leases), and the environment with a fresh access key.

    rig = private_sim_rig(tmp_path)               # rig.path, rig.document, rig.env
    with sim_up(rig) as up:                        # the bench in a `hil sim up` process
        up.addresses["console"], up.pid
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hil.configfile import read_yaml, validate
from hil.conformance.power import defect_rig
from hil.rig.model import Rig
from hil.service.server import new_access_key

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PrivateRig:
    path: Path
    document: dict[str, Any]
    env: dict[str, str]          # os.environ with the rig's access key set


def private_sim_rig(tmp_path: Path, rig: str = "sim-nrf52832", name: str | None = None
                    ) -> PrivateRig:
    """``name``: the copy's name before ``--control`` (default: the rig's, made unique, so that
    tests run side by side under xdist never wait on each other's leases)."""
    base = read_yaml(ROOT / "rigs" / f"{rig}.yaml")
    base["name"] = name or f"{rig}-{uuid.uuid4().hex[:6]}"
    document = defect_rig(base, validate(Rig, base, rig), None, tmp_path / "state")
    path = tmp_path / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    env = {**os.environ, document["identity"]["access_key_env"]: new_access_key()}
    return PrivateRig(path, document, env)


@dataclass(frozen=True)
class SimUp:
    pid: int
    addresses: dict[str, str]    # part -> the path it is reached at (console, power, rf)


@contextmanager
def sim_up(rig: PrivateRig) -> Iterator[SimUp]:
    """The rig's bench run by ``hil sim up`` until the block ends (then stopped cleanly)."""
    up = subprocess.Popen([sys.executable, "-m", "hil.cli", "sim", "up", str(rig.path)],
                          env=rig.env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert up.stdout is not None
    try:
        started = "".join(up.stdout.readline() for _ in range(4))
        assert started.endswith("up (Ctrl-C or SIGTERM stops it)\n"), started
        yield SimUp(up.pid, dict(re.findall(r": (\w+) at (\S+)", started)))
    finally:
        up.terminate()
        stopped = up.wait(30)
        up.stdout.close()
    assert stopped == 0
