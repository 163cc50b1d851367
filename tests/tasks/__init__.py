"""Tests for slimkit.tasks."""
