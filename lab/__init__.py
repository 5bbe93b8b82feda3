"""joinproxy-lab: network-namespace topologies for tests, benchmarks and the demo."""

from .netns import LabError
from .topology import Host, Lab, LabProcess, Topology, wait_for

__all__ = ["Host", "Lab", "LabError", "LabProcess", "Topology", "wait_for"]
