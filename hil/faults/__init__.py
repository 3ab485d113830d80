"""The fault catalog: every fault a conformance scenario can inject, named once, with where it is
injected and what the rig or the service must offer for it (``hil.faults.catalog``)."""

from hil.faults.catalog import CATALOG, FaultSpec, Injection, Where, fault_spec

__all__ = ["CATALOG", "FaultSpec", "Injection", "Where", "fault_spec"]
