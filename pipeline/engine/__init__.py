"""The workflow engine: stages as data (`stage`), what runs (`plan`), running it (`execute`), the artifact store
(`store`) and one builder per stage folder (`locks`). Knows nothing of any particular stage."""
