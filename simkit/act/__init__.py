"""ACT's data side: `contrast` makes Phase 1 action pairs and Phase 2 on-policy trajectory pairs,
`pairs` is `simkit pairs build`, `pairstats` reads what a pair stream contrasts."""
