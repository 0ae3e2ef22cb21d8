"""The paper's figures and tables, regenerated from runs: `python -m paper_figures.make_all`."""
