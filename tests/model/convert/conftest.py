"""The training tests' tiny ShapesWorld and shrunk Hydra config, for the end-to-end conversion test."""

from tests.training import conftest as training

shapesworld = training.shapesworld
compose_stage = training.compose_stage
