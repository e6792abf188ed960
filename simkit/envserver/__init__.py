"""The environments as a service: `server` (`simkit env-server`), `remote` (`simkit.RemoteEnv`,
its client) and `listing` (`simkit envs`)."""
