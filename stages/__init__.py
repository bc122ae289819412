"""One thin click command per DVC stage; all ML logic lives in pipeline/."""
