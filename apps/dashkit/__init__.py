"""The dashboard's toolkit: cached reads of the run store, pure series maths, plotly
figures, the architecture graph and the scaling-law fits. The pages compose them.

Nothing here imports torch or stabilitylab.model / train: the only door into the lab is
stabilitylab.store (and stabilitylab.analysis.scaling for fitted laws)."""
