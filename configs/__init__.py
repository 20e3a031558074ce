"""Run tiers. Each module lists, per pipeline stage, the flags run_speedrun.py passes to it."""
