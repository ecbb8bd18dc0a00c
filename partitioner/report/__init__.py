"""Reports of a graded plan: markdown, Gantt chart, Chrome trace, units."""
