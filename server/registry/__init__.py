"""The prompt registry: tasks resolved to prompts on the device, kept in step across replicas."""
