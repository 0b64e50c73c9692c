"""The crash-consistency campaign: power cuts after every write, recovery checked.

Modules, in the order data flows through them:

* ``systems``   the system under test (the engine) and deterministic image formatting;
* ``variants``  deliberately broken systems that the campaign must catch;
* ``session``   a workload's recorded view of the store (txns with submit/ack trace positions);
* ``workloads`` seeded workloads, registered as plug-ins;
* ``vaultworkloads`` the file vault's workloads (through ``statefsd.testing.vaultkv``)
  and its invariants (13)-(17) on every first cut;
* ``outcomes``  which power-cut outcomes to try at a crash point;
* ``timeline``  invariants (1)-(3): the recovered state is an allowed prefix;
* ``records``   invariants (8) and (10): txn ids and nonces never reused;
* ``fsckhook``  invariant (6): fsck on the recovered image;
* ``checker``   recovery of one crashed image and every check, (4) and (5) included;
* ``runner``    crash points x outcomes, second cuts, worker processes, reproduction;
* ``repro``     reproduction codes; ``__main__`` the command line.

docs/crash-model.md describes the crash model and how to reproduce a failure.
"""
