"""Recipes: typed, versioned YAML that chains techniques into stages."""

from slimkit.recipe.schema import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe"]
