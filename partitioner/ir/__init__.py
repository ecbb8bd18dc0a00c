"""The values the stages hand on: cost graph, hardware spec, plan, settings, schedule IR."""
