"""Backbone-step fixtures: the training tests' tiny ShapesWorld and shrunk tiny_cpu config."""

from tests.training import conftest as training

shapesworld = training.shapesworld
compose_stage = training.compose_stage
