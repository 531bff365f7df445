"""The workflow engine: stages as data (`stage`), what runs (`plan`), running it (`execute`), the artifact store
(`store`, with `generations`, `nodecache`, `leases`), one builder per stage folder (`locks`) and each stage's last
fingerprint (`run_pointer`). Knows nothing of any particular stage."""
