from .env_report import environment_report

print(environment_report())
