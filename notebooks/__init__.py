"""The course notebooks' helper modules (the notebooks themselves are NN_name.ipynb with their .py twins)."""
