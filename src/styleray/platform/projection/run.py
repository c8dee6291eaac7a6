"""``styleray project``'s entry point: one image file in this process, or a folder, zip or bucket as a Ray job."""

from __future__ import annotations

from styleray.platform.projection.options import ProjectOptions


def run_project(options: ProjectOptions) -> dict:
    """{"single": its summary} for an image file; {"folder": the job's summary} for many targets."""
    if options.single_image:
        from styleray.platform.projection.single import project_file

        return {"single": project_file(options)}
    from styleray.platform.projection.job import run_folder

    return {"folder": run_folder(options)}
