from fastapi import APIRouter

from app.api.deps import SettingsDep
from app.schemas import RecipeOut
from app.services.recipes import list_recipes

router = APIRouter(prefix="/configs", tags=["jobs"])


@router.get("", response_model=list[RecipeOut], summary="Training recipes a job may name in 'config'")
def list_configs(settings: SettingsDep) -> list[RecipeOut]:
    return [RecipeOut(**recipe) for recipe in list_recipes(settings)]
