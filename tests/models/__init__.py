"""Tests for slimkit.models."""
