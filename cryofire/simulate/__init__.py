"""Simulated datasets with ground truth: a built-in hinged phantom or user volumes."""

from cryofire.simulate.dataset import SimulationConfig, simulate_dataset
from cryofire.simulate.phantom import Phantom, build_phantom, conformations

__all__ = ["Phantom", "SimulationConfig", "build_phantom", "conformations", "simulate_dataset"]
