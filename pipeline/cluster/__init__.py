"""Ray and the cluster: starting Ray (`runtime`), where each stage's tasks run (`resources`), the checks that make
a multi-node run safe (`preflight`) and Ray jobs (`jobs`: `llmpipe submit`, `logs`, `status --job`, `stop`)."""
