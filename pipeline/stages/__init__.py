"""The stages, in topological order: tokenizer -> prepare -> train -> (index) -> evaluate, (tasks), decode.

`index` and `tasks` are optional: an `index:` / `tasks:` section enables them. `index` needs the tokenizer, and
`train` when it embeds; `tasks` needs the tokenizer and `train`."""

from pipeline.stages import decode, evaluate, index, prepare, tasks, tokenizer, train

STAGES = [tokenizer.STAGE, prepare.STAGE, train.STAGE, index.STAGE, evaluate.STAGE, tasks.STAGE, decode.STAGE]
