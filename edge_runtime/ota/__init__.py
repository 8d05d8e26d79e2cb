"""Model updates in the field: signed bundles, install with self-test, atomic activation, rollback.

- bundle.py: `models pack` / `models verify`: one tar of a model folder whose manifest lists every file's
  sha256 and the self-test vectors, signed with ed25519 (manifest.toml.sig, the same file the registry checks).
- selftest.py: test vectors made at pack time (fixed inputs, each variant's outputs) and their check on every
  engine and precision this device uses.
- store.py: versioned folders in the state directory, `active/<name>` as a symlink swapped by one rename, the
  previous version kept, a ledger of every version ever installed (a version never changes content).
- install.py: the journaled step machine receiving -> verifying -> unpacking -> self-test -> activation; a
  restart finishes or discards whatever a crash interrupted.
- chunks.py: a bundle cut into MQTT messages and put together again on disk, resumable across link drops.
- health.py: the rule that rolls a freshly switched version back in its first minutes.
- agent.py: what the daemon runs: MQTT bundles in, installs on its own thread, status out, hot switch hook.
"""
