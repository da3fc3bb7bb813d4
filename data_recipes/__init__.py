"""Recipes that download public perturbation screens and write cellpert-ready ``.h5ad`` files.

Each recipe is a script (``python -m data_recipes.norman2019 --out ...``) and a pure
``preprocess_*`` function that works on files already on disk. See ``data_recipes/README.md``.
"""
