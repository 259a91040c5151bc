"""Wire formats shared by the cloud and the device: the only cloud code the agent imports."""
