"""Multi-process tests: each module spawns its ranks once (a module fixture) and asserts per case."""
