"""Ray-compatible utilities (`ray.util` counterparts).

Submodules such as `meshray.util.scheduling_strategies` mirror the module of
the same name in Ray so that `from ray.util.x import Y` ports by renaming the
package only.
"""

__all__ = []
