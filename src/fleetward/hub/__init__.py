"""The hub: the MQTT gateway devices talk to, in the Azure IoT Hub device dialect."""
