"""The offline pairwise trainer (DPO and every pairwise loss, SRPO, TPO): `trainer.train`, the recipe's
weighted objective and its forward (`objective`), reference log-probs live or cached (`reference`), batching
choices (`throughput`) and the held-out preference metrics (`heldout`). The iterative loops (align_cli/iterative)
call `trainer.train` once per round or stage."""
