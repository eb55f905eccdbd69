"""Word and fact lists behind the task suite, compiled by hand for this project.

Each list is a plain multi-line string ("a:b" per item, or one word per item) so it reads like a
table and diffs cleanly. Entries were chosen to have one clear answer: pairs whose answer is disputed
(Bolivia's capital, "hanged"/"hung", "indexes"/"indices") or whose word belongs to two categories
("orange", "cricket", "squash") were left out on purpose.
"""


def pairs(text):
    """Parse "a:b" lines (blank lines and surrounding spaces ignored) into a list of (a, b)."""
    out = []
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            a, b = line.split(":")
            out.append((a.strip(), b.strip()))
    return out


def words(text):
    return text.split()


# --- general suite ----------------------------------------------------------------------------

# word: its opposite. No pair appears in both directions, so a test pair is never the mirror of a
# training pair.
ANTONYMS = pairs("""
hot:cold big:small fast:slow happy:sad up:down open:closed rich:poor strong:weak
hard:soft early:late wet:dry clean:dirty full:empty high:low long:short thick:thin
wide:narrow deep:shallow loud:quiet good:bad right:wrong true:false win:lose
push:pull buy:sell give:take come:go enter:exit arrive:depart above:below
inside:outside before:after first:last left:right north:south east:west day:night
black:white love:hate friend:enemy war:peace alive:dead asleep:awake brave:cowardly
cheap:expensive safe:dangerous easy:difficult simple:complex sweet:sour near:far
top:bottom front:back always:never everything:nothing more:less many:few
maximum:minimum increase:decrease accept:reject ancient:modern bright:dim
careful:careless polite:rude honest:dishonest possible:impossible visible:invisible
legal:illegal known:unknown laugh:cry smile:frown sit:stand summer:winter
man:woman boy:girl king:queen husband:wife father:mother son:daughter brother:sister
import:export input:output inhale:exhale include:exclude internal:external
interior:exterior major:minor positive:negative plus:minus add:subtract
multiply:divide odd:even rough:smooth sharp:dull tight:loose raw:cooked fresh:stale
sick:healthy solid:liquid float:sink freeze:melt forget:remember lend:borrow
teach:learn catch:throw pass:fail find:lose guilty:innocent generous:selfish
humble:proud wise:foolish clever:stupid friendly:hostile victory:defeat
success:failure profit:loss attack:defend joy:sorrow hope:despair praise:blame
reward:punishment sunrise:sunset morning:evening past:future permanent:temporary
private:public absent:present rare:common natural:artificial vertical:horizontal
optimistic:pessimistic junior:senior superior:inferior indoor:outdoor uphill:downhill
upstairs:downstairs heavy:light tiny:huge most:least best:worst better:worse
forward:backward inner:outer upper:lower over:under on:off yes:no here:there
employer:employee teacher:student parent:child guest:host buyer:seller winner:loser
hero:villain create:destroy connect:disconnect agree:disagree like:dislike
appear:disappear allow:forbid obey:disobey dawn:dusk ceiling:floor heaven:hell
boring:interesting beautiful:ugly neat:messy wild:tame mature:immature
patient:impatient kind:cruel fair:unfair lucky:unlucky cheerful:gloomy
vacant:occupied lead:follow rise:fall ascend:descend whisper:shout save:spend
question:answer
""".replace(" ", "\n"))

# country: capital. Countries whose capital is disputed, recently moved, or equal to the country's
# own name are left out.
CAPITALS = pairs("""
Afghanistan:Kabul
Albania:Tirana
Algeria:Algiers
Angola:Luanda
Argentina:Buenos Aires
Armenia:Yerevan
Australia:Canberra
Austria:Vienna
Azerbaijan:Baku
Bahamas:Nassau
Bahrain:Manama
Bangladesh:Dhaka
Barbados:Bridgetown
Belarus:Minsk
Belgium:Brussels
Belize:Belmopan
Bhutan:Thimphu
Bosnia and Herzegovina:Sarajevo
Botswana:Gaborone
Brazil:Brasília
Brunei:Bandar Seri Begawan
Bulgaria:Sofia
Burkina Faso:Ouagadougou
Cambodia:Phnom Penh
Cameroon:Yaoundé
Canada:Ottawa
Cape Verde:Praia
Central African Republic:Bangui
Chile:Santiago
China:Beijing
Colombia:Bogotá
Comoros:Moroni
Costa Rica:San José
Croatia:Zagreb
Cuba:Havana
Cyprus:Nicosia
Czech Republic:Prague
Denmark:Copenhagen
Dominica:Roseau
Dominican Republic:Santo Domingo
Ecuador:Quito
Egypt:Cairo
El Salvador:San Salvador
Eritrea:Asmara
Estonia:Tallinn
Ethiopia:Addis Ababa
Fiji:Suva
Finland:Helsinki
France:Paris
Gabon:Libreville
Gambia:Banjul
Georgia:Tbilisi
Germany:Berlin
Ghana:Accra
Greece:Athens
Guatemala:Guatemala City
Guinea:Conakry
Guinea-Bissau:Bissau
Guyana:Georgetown
Haiti:Port-au-Prince
Honduras:Tegucigalpa
Hungary:Budapest
Iceland:Reykjavik
India:New Delhi
Indonesia:Jakarta
Iran:Tehran
Iraq:Baghdad
Ireland:Dublin
Italy:Rome
Jamaica:Kingston
Japan:Tokyo
Jordan:Amman
Kazakhstan:Astana
Kenya:Nairobi
Kuwait:Kuwait City
Kyrgyzstan:Bishkek
Laos:Vientiane
Latvia:Riga
Lebanon:Beirut
Lesotho:Maseru
Liberia:Monrovia
Libya:Tripoli
Liechtenstein:Vaduz
Lithuania:Vilnius
Madagascar:Antananarivo
Malawi:Lilongwe
Malaysia:Kuala Lumpur
Maldives:Malé
Mali:Bamako
Malta:Valletta
Mauritania:Nouakchott
Mauritius:Port Louis
Mexico:Mexico City
Moldova:Chisinau
Mongolia:Ulaanbaatar
Montenegro:Podgorica
Morocco:Rabat
Mozambique:Maputo
Namibia:Windhoek
Nepal:Kathmandu
Netherlands:Amsterdam
New Zealand:Wellington
Nicaragua:Managua
Niger:Niamey
Nigeria:Abuja
North Korea:Pyongyang
North Macedonia:Skopje
Norway:Oslo
Oman:Muscat
Pakistan:Islamabad
Panama:Panama City
Papua New Guinea:Port Moresby
Paraguay:Asunción
Peru:Lima
Philippines:Manila
Poland:Warsaw
Portugal:Lisbon
Qatar:Doha
Romania:Bucharest
Russia:Moscow
Rwanda:Kigali
Samoa:Apia
Saudi Arabia:Riyadh
Senegal:Dakar
Serbia:Belgrade
Seychelles:Victoria
Sierra Leone:Freetown
Slovakia:Bratislava
Slovenia:Ljubljana
Solomon Islands:Honiara
Somalia:Mogadishu
South Africa:Pretoria
South Korea:Seoul
South Sudan:Juba
Spain:Madrid
Sudan:Khartoum
Suriname:Paramaribo
Sweden:Stockholm
Switzerland:Bern
Syria:Damascus
Taiwan:Taipei
Tajikistan:Dushanbe
Tanzania:Dodoma
Thailand:Bangkok
Timor-Leste:Dili
Togo:Lomé
Trinidad and Tobago:Port of Spain
Tunisia:Tunis
Turkey:Ankara
Turkmenistan:Ashgabat
Uganda:Kampala
Ukraine:Kyiv
United Arab Emirates:Abu Dhabi
United Kingdom:London
United States:Washington, D.C.
Uruguay:Montevideo
Uzbekistan:Tashkent
Vanuatu:Port Vila
Venezuela:Caracas
Vietnam:Hanoi
Yemen:Sanaa
Zambia:Lusaka
Zimbabwe:Harare
""")

# singular: plural. Regular -s, -es, -ies, -ves, unchanged, Latin/Greek and fully irregular forms.
PLURALS = pairs("""
dog:dogs cat:cats book:books car:cars tree:trees house:houses apple:apples bird:birds
chair:chairs table:tables pen:pens cup:cups door:doors window:windows flower:flowers
river:rivers mountain:mountains friend:friends teacher:teachers student:students
horse:horses cow:cows pig:pigs duck:ducks frog:frogs egg:eggs hat:hats shoe:shoes
sock:socks shirt:shirts ring:rings bell:bells boat:boats ship:ships train:trains
plane:planes road:roads street:streets bridge:bridges village:villages town:towns
farm:farms field:fields garden:gardens lake:lakes star:stars planet:planets
cloud:clouds hand:hands eye:eyes ear:ears nose:noses arm:arms leg:legs finger:fingers
song:songs game:games ball:balls coin:coins key:keys bottle:bottles plate:plates
spoon:spoons lamp:lamps clock:clocks phone:phones computer:computers desk:desks
bag:bags map:maps letter:letters card:cards gift:gifts cake:cakes cookie:cookies
banana:bananas lemon:lemons carrot:carrots onion:onions girl:girls boy:boys
king:kings queen:queens doctor:doctors nurse:nurses farmer:farmers soldier:soldiers
pilot:pilots singer:singers idea:ideas dream:dreams word:words name:names
number:numbers picture:pictures movie:movies camera:cameras kitten:kittens
monkey:monkeys donkey:donkeys toy:toys day:days valley:valleys turkey:turkeys
chimney:chimneys roof:roofs chief:chiefs belief:beliefs piano:pianos photo:photos
radio:radios zoo:zoos
box:boxes fox:foxes bus:buses kiss:kisses class:classes dress:dresses wish:wishes
brush:brushes bench:benches lunch:lunches beach:beaches match:matches witch:witches
peach:peaches tax:taxes bush:bushes inch:inches church:churches dish:dishes
watch:watches glass:glasses tomato:tomatoes potato:potatoes hero:heroes echo:echoes
city:cities baby:babies party:parties story:stories family:families country:countries
lady:ladies berry:berries fly:flies cherry:cherries puppy:puppies body:bodies
hobby:hobbies army:armies library:libraries battery:batteries factory:factories
candy:candies penny:pennies
knife:knives wife:wives leaf:leaves wolf:wolves life:lives half:halves shelf:shelves
loaf:loaves calf:calves thief:thieves
man:men woman:women child:children tooth:teeth foot:feet mouse:mice goose:geese
person:people ox:oxen
cactus:cacti fungus:fungi nucleus:nuclei analysis:analyses crisis:crises
thesis:theses phenomenon:phenomena criterion:criteria radius:radii stimulus:stimuli
basis:bases oasis:oases hypothesis:hypotheses
""".replace(" ", "\n"))

# base form: simple past. Verbs whose past equals the base form (cut, put, read) are left out,
# since the "copy the input" distractor would then equal the answer.
PAST_TENSE = pairs("""
go:went eat:ate see:saw take:took give:gave come:came run:ran write:wrote drink:drank
sing:sang swim:swam begin:began ring:rang sit:sat stand:stood understand:understood
speak:spoke break:broke choose:chose freeze:froze steal:stole wake:woke drive:drove
ride:rode rise:rose fly:flew grow:grew know:knew throw:threw draw:drew blow:blew
fall:fell forget:forgot get:got buy:bought bring:brought think:thought fight:fought
catch:caught teach:taught seek:sought sell:sold tell:told find:found make:made
say:said pay:paid lay:laid hear:heard have:had do:did feel:felt keep:kept
sleep:slept leave:left meet:met send:sent spend:spent build:built lend:lent
lose:lost mean:meant hold:held win:won dig:dug shoot:shot feed:fed lead:led bite:bit
hide:hid slide:slid shake:shook forgive:forgave wear:wore tear:tore swear:swore
weep:wept creep:crept sweep:swept bend:bent bleed:bled flee:fled stick:stuck
strike:struck swing:swung sting:stung spin:spun sink:sank shrink:shrank
spring:sprang become:became arise:arose bind:bound grind:ground cling:clung
deal:dealt
walk:walked talk:talked play:played jump:jumped cook:cooked clean:cleaned
open:opened close:closed dance:danced laugh:laughed cry:cried try:tried
study:studied carry:carried marry:married hurry:hurried worry:worried stop:stopped
plan:planned drop:dropped shop:shopped hug:hugged beg:begged rob:robbed nod:nodded
clap:clapped hop:hopped grab:grabbed wash:washed watch:watched wait:waited
want:wanted need:needed start:started finish:finished help:helped call:called
ask:asked answer:answered listen:listened look:looked move:moved live:lived
love:loved like:liked hope:hoped smile:smiled arrive:arrived decide:decided
agree:agreed paint:painted visit:visited push:pushed pull:pulled climb:climbed
fill:filled kick:kicked kiss:kissed miss:missed pass:passed touch:touched
turn:turned use:used work:worked plant:planted borrow:borrowed count:counted
enjoy:enjoyed explain:explained follow:followed happen:happened join:joined
learn:learned remember:remembered return:returned save:saved share:shared
stay:stayed believe:believed change:changed collect:collected describe:described
fix:fixed invite:invited jog:jogged knock:knocked mix:mixed obey:obeyed
offer:offered pray:prayed prefer:preferred relax:relaxed repeat:repeated
shout:shouted solve:solved taste:tasted thank:thanked admit:admitted allow:allowed
attack:attacked bake:baked boil:boiled bury:buried check:checked cover:covered
deliver:delivered enter:entered fail:failed guess:guessed hate:hated land:landed
melt:melted order:ordered own:owned park:parked pick:picked place:placed
print:printed pour:poured reach:reached rescue:rescued rush:rushed sail:sailed
scream:screamed search:searched sign:signed sneeze:sneezed float:floated tie:tied
trust:trusted type:typed wander:wandered warn:warned wish:wished yell:yelled
""".replace(" ", "\n"))

# adjective: comparative. One-syllable and -y adjectives inflect; long ones take "more".
COMPARATIVES = pairs("""
big:bigger small:smaller tall:taller short:shorter fast:faster slow:slower old:older
young:younger long:longer strong:stronger weak:weaker hard:harder soft:softer cold:colder
warm:warmer hot:hotter high:higher low:lower rich:richer poor:poorer cheap:cheaper
dark:darker bright:brighter clean:cleaner dirty:dirtier easy:easier happy:happier
sad:sadder angry:angrier busy:busier funny:funnier heavy:heavier lazy:lazier lucky:luckier
pretty:prettier ugly:uglier early:earlier noisy:noisier tiny:tinier healthy:healthier
wet:wetter dry:drier thin:thinner fat:fatter good:better bad:worse deep:deeper wide:wider
narrow:narrower loud:louder quiet:quieter safe:safer brave:braver wise:wiser nice:nicer
large:larger late:later close:closer simple:simpler gentle:gentler kind:kinder calm:calmer
clear:clearer cool:cooler fresh:fresher full:fuller great:greater green:greener
proud:prouder quick:quicker rough:rougher sharp:sharper smart:smarter smooth:smoother
sweet:sweeter thick:thicker tight:tighter tough:tougher fine:finer pure:purer rare:rarer
ripe:riper wild:wilder
""".replace(" ", "\n")) + [(a, "more " + a) for a in words("""
    beautiful important expensive difficult interesting dangerous famous careful useful
    comfortable popular modern exciting boring powerful serious patient""")]

# category: members. Words with a second common sense in another category are left out.
CATEGORIES = {
    "animal": words("""
        dog cat horse cow pig sheep goat lion tiger bear wolf fox rabbit mouse elephant giraffe
        zebra monkey kangaroo koala panda deer camel donkey squirrel hedgehog otter beaver dolphin
        whale shark eagle owl parrot penguin duck chicken frog snake lizard crocodile turtle bee
        ant spider butterfly hippopotamus rhinoceros leopard cheetah gorilla moose raccoon swan
        pigeon flamingo octopus jellyfish crab"""),
    "fruit": words("""
        apple banana grape pear peach plum cherry strawberry blueberry raspberry watermelon melon
        pineapple mango papaya lemon coconut apricot fig pomegranate grapefruit nectarine
        tangerine avocado guava lychee cantaloupe blackberry cranberry persimmon"""),
    "color": words("""
        red blue green yellow purple pink brown black white gray turquoise beige maroon crimson
        scarlet magenta cyan indigo teal khaki"""),
    "sport": words("""
        soccer tennis basketball baseball golf hockey rugby volleyball badminton boxing wrestling
        cycling skiing surfing archery bowling handball softball lacrosse polo judo karate
        taekwondo snowboarding rowing gymnastics triathlon weightlifting"""),
    "vehicle": words("""
        car bus truck bicycle motorcycle train airplane helicopter boat ship submarine tractor
        taxi van scooter tram ambulance jeep canoe yacht rocket limousine ferry wagon minivan"""),
}

# Short review sentences are built from these (subject, adjective) combinations.
REVIEW_SUBJECTS = [
    "The movie", "The food", "The service", "This book", "The hotel", "The concert",
    "The game", "The phone", "The teacher", "The trip", "The coffee", "The show", "The room",
    "The music", "The class",
]
POSITIVE = words("""
    wonderful great excellent amazing fantastic delightful lovely superb brilliant enjoyable
    perfect pleasant outstanding charming impressive fun beautiful marvelous splendid terrific""")
NEGATIVE = words("""
    terrible awful horrible boring disappointing dreadful bad poor unpleasant annoying
    disgusting mediocre painful miserable dull rude broken useless frustrating awkward""")

# country: main language. Countries with two equally common languages are left out.
LANGUAGES = pairs("""
France:French
Germany:German
Spain:Spanish
Italy:Italian
Portugal:Portuguese
Brazil:Portuguese
Mexico:Spanish
Argentina:Spanish
Japan:Japanese
China:Chinese
South Korea:Korean
Russia:Russian
Greece:Greek
Turkey:Turkish
Poland:Polish
Netherlands:Dutch
Sweden:Swedish
Norway:Norwegian
Denmark:Danish
Finland:Finnish
Hungary:Hungarian
Czech Republic:Czech
Romania:Romanian
Ukraine:Ukrainian
Thailand:Thai
Vietnam:Vietnamese
Indonesia:Indonesian
Iran:Persian
Egypt:Arabic
Saudi Arabia:Arabic
Israel:Hebrew
Austria:German
Colombia:Spanish
Peru:Spanish
Chile:Spanish
Cuba:Spanish
Australia:English
United States:English
United Kingdom:English
New Zealand:English
Iceland:Icelandic
Bulgaria:Bulgarian
Serbia:Serbian
Croatia:Croatian
Slovakia:Slovak
Slovenia:Slovenian
Lithuania:Lithuanian
Latvia:Latvian
Estonia:Estonian
Albania:Albanian
Armenia:Armenian
Georgia:Georgian
Mongolia:Mongolian
Jordan:Arabic
Iraq:Arabic
Syria:Arabic
Morocco:Arabic
Algeria:Arabic
Tunisia:Arabic
Libya:Arabic
Venezuela:Spanish
Ecuador:Spanish
Uruguay:Spanish
Bolivia:Spanish
Guatemala:Spanish
Honduras:Spanish
Nicaragua:Spanish
Costa Rica:Spanish
Panama:Spanish
Dominican Republic:Spanish
El Salvador:Spanish
Angola:Portuguese
Mozambique:Portuguese
Jamaica:English
Bangladesh:Bengali
Pakistan:Urdu
Laos:Lao
Cambodia:Khmer
Myanmar:Burmese
Nepal:Nepali
Malaysia:Malay
Uzbekistan:Uzbek
Azerbaijan:Azerbaijani
Kuwait:Arabic
Qatar:Arabic
Oman:Arabic
Yemen:Arabic
Lebanon:Arabic
Sudan:Arabic
Senegal:French
Niger:French
Ethiopia:Amharic
Somalia:Somali
Tanzania:Swahili
""")

# --- training tasks ---------------------------------------------------------------------------

# Plain lowercase words for procedurally built phrases (uppercase, reverse, acronym, spelling).
PHRASE_WORDS = words("""
    red blue green small big old new happy quiet bright dark warm cold soft loud fast slow
    apple river garden window table paper music water stone forest cloud summer winter
    morning evening dog cat bird horse fish tree flower house road city school book letter
    chair lamp clock door bread milk cheese honey sugar salt rain snow wind storm moon sun
    star ocean island valley mountain bridge market friend family doctor teacher farmer
    king queen child girl boy ship train plane car bike coffee tea juice glass plate spoon
    game story dream song dance party castle tower field lake beach desert candle
""")

FIRST_NAMES = words("""
    Anna Ben Carla David Emma Frank Grace Henry Irene Jack Kate Leo Maria Nick Olivia Paul
    Rosa Sam Tina Victor Wendy Adam Bella Chris Diana Eric Fiona George Hannah Ivan Julia Kevin
    Laura Mark Nora Oscar Peter Rachel Simon Tom Ursula Vera Walter Zoe Alice Bruno Clara Daniel
""")
SURNAMES = words("""
    Smith Brown Miller Wilson Moore Taylor Clark Hall Allen Young King Wright Scott Green Baker
    Adams Nelson Hill Campbell Carter Turner Parker Evans Edwards Collins Stewart Morris Rogers
    Reed Cook Morgan Bell Murphy Bailey Cooper Howard Ward Cox Richardson Wood Watson Brooks
    Gray James Bennett Hughes Price Myers Long Foster
""")

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
