"""The test rig: the simulated block device, the power-loss and media-fault
campaigns and the QEMU guest's self-test. Product code never imports it
(the daemon loads the self-test only when --selftest runs)."""
