"""Evaluation of the running service on the demo family: knowledge vs behaviour, β/λ sweeps, top-k.

`eft eval` (see `command.py`) sends held-out questions through a running EFT service over gRPC
and scores the answers. The modules each own one job:

* `scoring`      -- per-answer scores and their aggregation, gap recovery, monotonicity (pure)
* `conditions`   -- which requests to send: recipes, the β and λ sweeps, top-k × conservative
* `runner`       -- sends (question × condition) through a `Generator`, a few threads at a time
* `backends`     -- `Generator`s: gRPC to a running service, or an in-process coordinator
* `topk_accuracy`-- in-process top-k vs exact merge: greedy agreement and total variation
* `report`       -- turns scored results into table rows and the headline figures
* `tables`       -- CSV, markdown and console rendering of rows
* `plots`        -- the β and λ sweep figures (matplotlib, Agg)
* `command`      -- the `eft eval` orchestration: start or reach a stack, run, write `docs/results`
"""
