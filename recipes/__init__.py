"""The shipped YAML recipes, installed as package data of align_cli.recipes (`align recipes` lists them)."""
