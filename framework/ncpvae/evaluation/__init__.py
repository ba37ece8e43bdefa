"""The evaluation stage: metrics of a trained run, ``evaluation.json`` and the report
(``pipeline``: the stage; ``metrics_table``: the disentanglement metrics, listed once;
``config``: its ``[evaluate]`` section, composed from the metrics' own config classes;
``report``: the document and its HTML / Markdown renderers; ``format``: number formatting)."""
