"""`align eval`: AlpacaEval-style evaluation (generate, judge pairwise against references, score with
alpaca_eval's metrics, report). Modules: formats (files), answers (generation), judges/ (rule,
reward_model, openai), metrics and length_control (scores), report (leaderboard, Markdown, PNG),
runner (the flow), cli (the Typer sub-app)."""
