"""The doctor: checks a config's data, initialisation and optimisation before a long run and
names what is wrong (doctor.py is its entry point; `diagnose` in doctor/run.py its API)."""
