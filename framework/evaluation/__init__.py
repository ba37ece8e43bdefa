"""The evaluation stage: metrics of a trained run, ``evaluation.json`` and the report
(``pipeline``: the stage; ``config``: its ``[evaluate]`` section; ``report``: the document)."""
