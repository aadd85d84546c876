"""Word lists and instruction phrasings of the `toy-steer` model (written for this project; see docs/toy-steer.md).

Contents are requests such as "Write a short poem about the river for Anna." built from the lists below; the
default response restates them ("Sure, Anna, here is a short poem about the river."), and each instruction type
transforms that default deterministically. Phrasings are built per language as frames x cores (a frame such as
"Please {core}." around a core such as "write your answer in capital letters"), every combination distinct.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------- content

VERBS = ("Write", "Compose", "Draft", "Create", "Prepare", "Give me", "Make")
"""Request verbs (all consonant-initial objects follow, so "a" never has to become "an")."""

KINDS = {  # English -> (French noun with its article, grammatical gender)
    "poem": ("un poème", "m"), "story": ("une histoire", "f"), "letter": ("une lettre", "f"),
    "song": ("une chanson", "f"), "note": ("une note", "f"), "speech": ("un discours", "m"),
    "joke": ("une blague", "f"), "riddle": ("une devinette", "f"), "summary": ("un résumé", "m"),
    "report": ("un rapport", "m"), "toast": ("un toast", "m"), "review": ("une critique", "f"),
    "list": ("une liste", "f"), "message": ("un message", "m"), "tale": ("un conte", "m"),
    "limerick": ("un limerick", "m"),
}

ADJS = {  # English -> (French masculine, French feminine)
    "short": ("court", "courte"), "long": ("long", "longue"), "funny": ("drôle", "drôle"),
    "sad": ("triste", "triste"), "happy": ("joyeux", "joyeuse"), "simple": ("simple", "simple"),
    "strange": ("étrange", "étrange"), "gentle": ("doux", "douce"), "brave": ("courageux", "courageuse"),
    "warm": ("chaleureux", "chaleureuse"), "clever": ("malin", "maligne"),
    "serious": ("sérieux", "sérieuse"), "cheerful": ("gai", "gaie"), "formal": ("formel", "formelle"),
    "friendly": ("amical", "amicale"), "poetic": ("poétique", "poétique"), "modern": ("moderne", "moderne"),
    "classic": ("classique", "classique"), "tiny": ("petit", "petite"), "polite": ("poli", "polie"),
    "dramatic": ("dramatique", "dramatique"), "honest": ("honnête", "honnête"), "lively": ("vif", "vive"),
    "curious": ("curieux", "curieuse"), "bold": ("audacieux", "audacieuse"), "calm": ("paisible", "paisible"),
    "detailed": ("détaillé", "détaillée"), "magical": ("magique", "magique"), "rhyming": ("rimé", "rimée"),
}

TOPICS = {  # English noun (used as "the {noun}") -> French noun phrase with its article
    "river": "la rivière", "mountain": "la montagne", "forest": "la forêt", "ocean": "la mer",
    "city": "la ville", "village": "le village", "garden": "le jardin", "winter": "l'hiver",
    "summer": "l'été", "moon": "la lune", "sun": "le soleil", "rain": "la pluie", "wind": "le vent",
    "storm": "la tempête", "school": "l'école", "teacher": "le professeur", "doctor": "le médecin",
    "baker": "le boulanger", "farmer": "le fermier", "king": "le roi", "prince": "le prince",
    "dragon": "le dragon", "cat": "le chat", "dog": "le chien", "horse": "le cheval", "bird": "l'oiseau",
    "fish": "le poisson", "bridge": "le pont", "castle": "le château", "train": "le train",
    "bicycle": "le vélo", "computer": "l'ordinateur", "library": "la bibliothèque", "market": "le marché",
    "kitchen": "la cuisine", "coffee": "le café", "bread": "le pain", "cheese": "le fromage",
    "music": "la musique", "painting": "la peinture", "football": "le football", "holiday": "les vacances",
    "birthday": "l'anniversaire", "wedding": "le mariage", "friendship": "l'amitié", "family": "la famille",
    "journey": "le voyage", "island": "l'île", "desert": "le désert", "lake": "le lac", "star": "l'étoile",
    "night": "la nuit", "morning": "le matin", "spring": "le printemps", "autumn": "l'automne",
    "robot": "le robot", "planet": "la planète", "museum": "le musée", "hospital": "l'hôpital",
    "office": "le bureau", "street": "la rue", "house": "la maison", "door": "la porte",
    "window": "la fenêtre", "clock": "l'horloge", "book": "le livre", "pencil": "le crayon",
    "flower": "la fleur", "tree": "l'arbre", "snow": "la neige", "fire": "le feu", "cloud": "le nuage",
    "rabbit": "le lapin", "bear": "l'ours", "wolf": "le loup", "ship": "le navire", "harbor": "le port",
    "tower": "la tour", "farm": "la ferme", "election": "l'élection", "exam": "l'examen",
}

NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Laura", "Marco",
         "Nora", "Oscar", "Paula", "Rosa", "Sam", "Tom", "Vera", "Walter", "Lucy", "Peter", "Sofia", "Leo",
         "Mia", "Noah", "Julia", "Henry", "Alice", "Simon")

KEYWORDS = ("banana", "rocket", "lantern", "pepper", "violin", "meadow")
"""keywords:existence asks for one of these; none of them occurs in any content or default response."""

END_PHRASE = "Is there anything else I can help with?"
"""startend:end_checker's fixed phrase (one of IFEval's own)."""

# ---------------------------------------------------------------------------------------------------- phrasings
# Per language: frames (with "{core}" or "{Core}" for a capitalised core) and per instruction type cores.
# "{kw}" in a core is the keyword of keywords:existence; '"{end}"' the end phrase.

FRAMES = {
    "en": ("{Core}.", "Please {core}.", "Make sure to {core}.", "I want you to {core}.", "{Core}, please."),
    "fr": ("{Core}.", "S'il te plaît, {core}.", "{Core}, merci.", "Je te demande ceci : {core}.",
           "Merci de bien vouloir suivre ceci : {core}."),
    "de": ("{Core}.", "Bitte {core}.", "{Core}, bitte.", "Ich bitte dich: {core}.", "Wichtig: {core}."),
    "es": ("{Core}.", "Por favor, {core}.", "{Core}, por favor.", "Te pido esto: {core}.", "Importante: {core}."),
}

CORES: dict[str, dict[str, tuple[str, ...]]] = {
    "change_case:english_capital": {
        "en": ("write your whole answer in capital letters", "answer only in uppercase letters",
               "use all caps for your entire response", "reply in uppercase from start to end",
               "make every letter of your reply a capital letter"),
        "fr": ("écris toute ta réponse en lettres majuscules", "réponds uniquement en majuscules",
               "mets toute ta réponse en capitales", "utilise seulement des majuscules dans ta réponse",
               "rédige la réponse entièrement en majuscules"),
        "de": ("schreib deine ganze Antwort in Großbuchstaben", "antworte nur in Großbuchstaben",
               "verwende für die Antwort ausschließlich Großbuchstaben", "schreib alles in Versalien",
               "gib die Antwort komplett in Großbuchstaben aus"),
        "es": ("escribe toda tu respuesta en mayúsculas", "responde solo con letras mayúsculas",
               "usa únicamente mayúsculas en la respuesta", "pon toda la respuesta en letras capitales",
               "redacta la respuesta entera en mayúsculas"),
    },
    "change_case:english_lowercase": {
        "en": ("write your whole answer in lowercase letters", "answer only in small letters",
               "use no capital letters at all", "reply in lowercase from start to end",
               "make every letter of your reply lowercase"),
        "fr": ("écris toute ta réponse en lettres minuscules", "réponds uniquement en minuscules",
               "n'utilise aucune majuscule", "utilise seulement des minuscules dans ta réponse",
               "rédige la réponse entièrement en minuscules"),
        "de": ("schreib deine ganze Antwort in Kleinbuchstaben", "antworte nur in Kleinbuchstaben",
               "verwende keinen einzigen Großbuchstaben", "schreib alles klein",
               "gib die Antwort komplett in Kleinbuchstaben aus"),
        "es": ("escribe toda tu respuesta en minúsculas", "responde solo con letras minúsculas",
               "no uses ninguna letra mayúscula", "pon toda la respuesta en letras pequeñas",
               "redacta la respuesta entera en minúsculas"),
    },
    "startend:quotation": {
        "en": ("wrap your entire response in double quotation marks", "put your whole answer inside double quotes",
               "enclose the response in quotation marks", "surround your reply with double quotes",
               "start and end your answer with a double quote"),
        "fr": ("mets toute ta réponse entre guillemets doubles", "entoure ta réponse de guillemets",
               "place la réponse entière entre des guillemets", "encadre ta réponse avec des guillemets doubles",
               "commence et termine ta réponse par un guillemet"),
        "de": ("setz deine ganze Antwort in doppelte Anführungszeichen", "schließ die Antwort in Anführungszeichen ein",
               "umgib deine Antwort mit doppelten Anführungszeichen", "pack die ganze Antwort in Anführungszeichen",
               "beginne und beende deine Antwort mit einem Anführungszeichen"),
        "es": ("pon toda tu respuesta entre comillas dobles", "encierra la respuesta entre comillas",
               "rodea tu respuesta con comillas dobles", "escribe la respuesta completa entre comillas",
               "empieza y termina tu respuesta con unas comillas"),
    },
    "detectable_format:title": {
        "en": ("give your answer a title in double angular brackets", "start with a title wrapped in << and >>",
               "add a title such as <<my title>> at the top", "include a title inside double angle brackets",
               "put a title in double angular brackets before the answer"),
        "fr": ("donne un titre à ta réponse entre doubles chevrons", "commence par un titre entouré de << et >>",
               "ajoute un titre comme <<mon titre>> en haut", "inclus un titre entre doubles chevrons",
               "mets un titre entre doubles chevrons avant la réponse"),
        "de": ("gib deiner Antwort einen Titel in doppelten spitzen Klammern",
               "beginne mit einem Titel in << und >>", "füge oben einen Titel wie <<mein Titel>> hinzu",
               "nimm einen Titel in doppelten Winkelklammern auf",
               "setz vor die Antwort einen Titel in doppelten spitzen Klammern"),
        "es": ("ponle a tu respuesta un título entre dobles corchetes angulares",
               "empieza con un título rodeado de << y >>", "añade arriba un título como <<mi título>>",
               "incluye un título entre dobles paréntesis angulares",
               "escribe un título entre dobles corchetes angulares antes de la respuesta"),
    },
    "punctuation:no_comma": {
        "en": ("do not use any commas in your response", "avoid commas entirely", "write your answer without commas",
               "refrain from using a single comma", "leave out every comma"),
        "fr": ("n'utilise aucune virgule dans ta réponse", "évite complètement les virgules",
               "écris ta réponse sans virgules", "ne mets pas une seule virgule", "supprime toutes les virgules"),
        "de": ("verwende keine Kommas in deiner Antwort", "vermeide Kommas vollständig",
               "schreib deine Antwort ohne Kommas", "setz kein einziges Komma", "lass jedes Komma weg"),
        "es": ("no uses ninguna coma en tu respuesta", "evita las comas por completo", "escribe tu respuesta sin comas",
               "no pongas ni una sola coma", "omite todas las comas"),
    },
    "startend:end_checker": {
        "en": ('end your response with the exact phrase "{end}"', 'finish your answer with "{end}"',
               'close your reply with the phrase "{end}"', 'make "{end}" the last words of your answer',
               'conclude with exactly "{end}"'),
        "fr": ('termine ta réponse par la phrase exacte "{end}"', 'finis ta réponse avec "{end}"',
               'conclus ta réponse par la phrase "{end}"', 'fais de "{end}" les derniers mots de ta réponse',
               'achève ta réponse exactement par "{end}"'),
        "de": ('beende deine Antwort mit genau dem Satz "{end}"', 'schließ deine Antwort mit "{end}" ab',
               'hör mit dem Satz "{end}" auf', 'mach "{end}" zu den letzten Worten deiner Antwort',
               'ende exakt mit "{end}"'),
        "es": ('termina tu respuesta con la frase exacta "{end}"', 'acaba tu respuesta con "{end}"',
               'cierra la respuesta con la frase "{end}"', 'haz que "{end}" sean las últimas palabras',
               'concluye exactamente con "{end}"'),
    },
    "keywords:existence": {
        "en": ("include the word {kw} in your response", "mention the word {kw} somewhere",
               "make sure the word {kw} appears", "use the keyword {kw} in your answer",
               "work the word {kw} into your reply"),
        "fr": ("inclus le mot {kw} dans ta réponse", "mentionne quelque part le mot {kw}",
               "fais apparaître le mot {kw}", "utilise le mot-clé {kw} dans ta réponse",
               "glisse le mot {kw} dans ta réponse"),
        "de": ("verwende das Wort {kw} in deiner Antwort", "erwähne irgendwo das Wort {kw}",
               "lass das Wort {kw} vorkommen", "benutze das Schlüsselwort {kw} in der Antwort",
               "bau das Wort {kw} in deine Antwort ein"),
        "es": ("incluye la palabra {kw} en tu respuesta", "menciona en algún lugar la palabra {kw}",
               "haz que aparezca la palabra {kw}", "usa la palabra clave {kw} en tu respuesta",
               "mete la palabra {kw} en tu respuesta"),
    },
    "language:response_language": {
        "en": ("answer in French", "write your whole response in French", "reply only in the French language",
               "respond in French and no other language", "give your answer in French"),
        "fr": ("réponds en français", "écris toute ta réponse en français", "réponds uniquement en langue française",
               "utilise le français et aucune autre langue", "donne ta réponse en français"),
        "de": ("antworte auf Französisch", "schreib deine ganze Antwort auf Französisch",
               "antworte nur in französischer Sprache", "verwende Französisch und keine andere Sprache",
               "gib deine Antwort auf Französisch"),
        "es": ("responde en francés", "escribe toda tu respuesta en francés", "contesta solo en idioma francés",
               "usa el francés y ningún otro idioma", "da tu respuesta en francés"),
    },
}

LANGUAGES = ("en", "fr", "de", "es")
TYPES = tuple(CORES)
