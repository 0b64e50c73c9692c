"""The storage core: on-disk format, block devices, the log reader and
writer, replay and the engine. It imports nothing from the daemons, from
fsck_statefs or from the test rig (docs/DESIGN.md, "Layers")."""
